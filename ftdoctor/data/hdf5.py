"""HDF5 data: datasets ``images`` (N×H×W×C uint8 or N×C×H×W float, or N×H×W) and ``labels``
(``test_images``, ``test_labels`` for the test split), checked by :mod:`ftdoctor.h5safe` before any data is
read; images are read lazily, only the items asked for."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ftdoctor.data.arrays import (as_labels, capped, check_image_shape, file_classes, image_layout, stated_classes,
                                  to_chw_float)
from ftdoctor.data.sources import PathSource, register_data_source

if TYPE_CHECKING:
    from ftdoctor.data.bundle import DataOptions

from ftdoctor.errors import DataError, FtdoctorError


class HDF5Split:
    """Images in an HDF5 dataset, read item by item (the file is opened once per process)."""

    def __init__(self, path: str, key: str, layout: str, labels: np.ndarray, num_classes: int) -> None:
        self.path, self.key, self.layout = path, key, layout
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes
        self._file: Any = None

    def __getstate__(self) -> dict[str, Any]:  # h5py handles do not pickle (DataLoader workers)
        return {**self.__dict__, "_file": None}

    def read(self, indices: Sequence[int]) -> Tensor:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r", locking=False)   # checked by hdf5_split
        images = self._file[self.key]
        idx = np.asarray(indices, dtype=np.int64)
        try:
            if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
                block = images[int(idx[0]):int(idx[0]) + idx.size]
            else:  # h5py wants increasing, unique indices
                unique, inverse = np.unique(idx, return_inverse=True)
                block = images[unique][inverse]
            block = np.asarray(block)
        except Exception as exc:  # noqa: BLE001 - a damaged chunk (filter failure, bad checksum)
            raise DataError(f"cannot read the images of {self.path}: {exc}",
                            "the file is damaged; write it again") from None
        if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
            raise DataError(f"{self.path}:{self.key} holds NaN or infinite values",
                            "clean the images before probing")
        return to_chw_float(block, self.layout)


def hdf5_split(path: Path, opts: DataOptions) -> HDF5Split:
    """Datasets checked by :mod:`ftdoctor.h5safe` (no external storage, links or plugins) before reading."""

    from ftdoctor import h5safe
    from ftdoctor.safety import MAX_LABEL_BYTES

    keys = {"train": ("images", "labels"), "test": ("test_images", "test_labels")}
    remedy = "check that the file is complete and was written by HDF5 (h5py)"
    handle = h5safe.open_file(path, "the data file", remedy)
    with handle:
        found, links = h5safe.listing(handle, path, remedy)
        have = ", ".join(found) or "no datasets"
        x_key, y_key = keys[opts.split]
        if not {"images", "labels"} <= (set(found) | links):
            raise FtdoctorError(f"{path} needs the datasets 'images' and 'labels'; it has: {have}",
                                "write the images as 'images' (N×H×W×C uint8 or N×C×H×W float) "
                                "and the class indices as 'labels'")
        if not {x_key, y_key} <= (set(found) | links):
            raise FtdoctorError(f"{path} has no {opts.split} split (datasets {x_key}, {y_key}): "
                                f"it has train only ({have})",
                                "use --split train, or add test_images and test_labels to the file")
        try:
            images = h5safe.checked_dataset(handle, x_key, f"{path}:{x_key}")
            shape, dtype = tuple(images.shape), images.dtype
            label_sets = {}
            for k in ("labels", "test_labels"):
                if k in found or k in links:
                    ds = h5safe.checked_dataset(handle, k, f"{path}:{k}")
                    label_sets[k] = as_labels(h5safe.read_whole(ds, f"{path}:{k}", MAX_LABEL_BYTES),
                                               f"{path}:{k}")
            stated = handle.attrs.get("num_classes", handle[y_key].attrs.get("num_classes"))
        except FtdoctorError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: h5py raises many types
            raise FtdoctorError(f"cannot read the datasets of {path}: {exc}",
                                "check that the file is complete") from None
    layout = image_layout(shape, dtype, f"{path}:{x_key}")
    check_image_shape(shape, layout, f"{path}:{x_key}")
    from ftdoctor.safety import check_batch_bytes
    # the stored rows of one batch, before their float32 copy (float64 images take twice that)
    check_batch_bytes(opts.batch_size, shape[1:], f"stored images of {path}", itemsize=dtype.itemsize)
    labels = label_sets[y_key]
    if shape[0] != len(labels):
        raise FtdoctorError(f"{path}: {x_key} has {shape[0]} images but {y_key} has {len(labels)} labels",
                            "store one label per image")
    cap = capped(len(labels), opts.max_samples)
    num_classes = file_classes(list(label_sets.values()), stated_classes(stated, f"{path}: num_classes"),
                                str(path))
    return HDF5Split(str(path), x_key, layout, labels[:cap], num_classes)


@register_data_source(name="hdf5", priority=50, suffixes=(".h5", ".hdf5"))
class Hdf5Data(PathSource):
    def read(self, path: Path, opts: Any) -> Any:
        return hdf5_split(path, opts)
