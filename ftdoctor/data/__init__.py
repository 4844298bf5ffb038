"""Dataset names and paths -> a dataset and DataLoaders (SPEC §3 "Data", §8).

:func:`load_data` (:mod:`.bundle`) asks the registered data sources
(:mod:`.sources`) which one ``--data`` names, opens its capped split and
prepares it. The sources, in the order ``--data`` is resolved:

============  =====================================================  ==========================
source        ``--data``                                              module
============  =====================================================  ==========================
shapes        ``shapes`` / ``shapes:C``: the built-in procedural set  :mod:`.builtin`
fake          ``fake``: seeded uniform noise, 10 fixed labels         :mod:`.builtin`
textlines     ``textlines`` / ``textlines:2``: rendered text lines,    :mod:`.textlines`
              3×48×192, flipped four ways (or PP-OCR's two)
torchvision   ``cifar10 cifar100 mnist fashion-mnist svhn`` from      :mod:`.torchvision_sets`
              ``--data-root``, never downloaded unless ``--download``
datasets      a ``datasets`` ``save_to_disk`` folder (``--split`` any   :mod:`.tables`
              of its splits): text or image and label columns
folder        a directory: ImageFolder, or ``train/`` and ``test/``   :mod:`.folder`
table         ``.csv .tsv .jsonl .parquet``: text (pairs) or image    :mod:`.tables`
              paths, and labels (columns: :mod:`.columns`)
hdf5          ``.h5`` / ``.hdf5``: ``images`` and ``labels``            :mod:`.hdf5`
npz           ``.npz``: ``x``, ``y`` (``x_test``, ``y_test``)           :mod:`.npz`
============  =====================================================  ==========================

Text is tokenised with the model folder's tokenizer (:mod:`.text`); its items are mappings of token
ids and masks instead of images.

For the file formats the class count is 1 + the largest label of all the
splits the file holds (so train and test agree), unless the file states it: an
HDF5 attribute ``num_classes`` (on the file or on the labels) or an npz array
``num_classes``. Integer images are scaled to [0, 1] (uint8 by 255, uint16 by
65535); float images are used as stored.
"""
from __future__ import annotations

from ftdoctor.data import builtin, folder, hdf5, npz, tables, textlines, torchvision_sets  # noqa: F401,E402  (registration)
from ftdoctor.data.bundle import (
                                  IMAGENET_MEAN,
                                  IMAGENET_STD,
                                  NORMALIZATIONS,
                                  SPLITS,
                                  DataBundle,
                                  DataOptions,
                                  PreparedDataset,
                                  dataset_statistics,
                                  load_data,
)
from ftdoctor.data.sources import (
                                  DATA_SOURCES,
                                  DataSource,
                                  PathSource,
                                  input_paths,
                                  names_hint,
                                  register_data_source,
)
from ftdoctor.data.torchvision_sets import TORCHVISION_NAMES, default_data_root

__all__ = ["DATA_SOURCES", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "SPLITS", "TORCHVISION_NAMES",
           "DataBundle", "DataOptions", "DataSource", "PathSource", "PreparedDataset", "dataset_statistics",
           "default_data_root", "input_paths", "load_data", "names_hint", "register_data_source"]
