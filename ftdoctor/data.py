"""Dataset names and paths -> a dataset and DataLoaders (SPEC §3 "Data", §8).

:func:`load_data` turns ``--data`` and its companion options
(:class:`DataOptions`) into a :class:`DataBundle`: one split, capped to its
first ``max_samples`` items in dataset order, resized, adapted to the model's
input channels and normalised. Item ``i`` of the bundle's dataset is
``(x, y, i)`` — the index is the key of per-example randomness (SPEC §1.2),
so figures do not depend on batch size, order or sharding.

Sources, in the order ``--data`` is resolved:

* ``shapes`` / ``shapes:C`` — the built-in procedural set (:mod:`ftdoctor.shapes`).
* ``fake`` — seeded uniform noise, 10 random (but fixed) labels, 3×32×32
  (``--image-size`` sets the size), 1024 train / 256 test images.
* ``cifar10 cifar100 mnist fashion-mnist svhn`` — torchvision's own classes
  reading ``--data-root`` (default ``$FTDOCTOR_DATA`` or
  ``~/.cache/ftdoctor/data``); never downloaded unless ``--download``.
* a directory — ImageFolder (``DIR/CLASS/IMAGE``), or ``DIR/train/…`` and
  ``DIR/test/…`` for the two splits; images are resized to the first image's
  size where they differ, unless ``--image-size`` is given.
* ``.h5`` / ``.hdf5`` — datasets ``images`` (N×H×W×C uint8, N×C×H×W float or
  N×H×W) and ``labels``; ``test_images`` / ``test_labels`` for the test split.
  Read lazily: only the items asked for are read.
* ``.npz`` — arrays ``x``, ``y``; ``x_test``, ``y_test`` for the test split.

For the file formats the class count is 1 + the largest label of all the
splits the file holds (so train and test agree), unless the file states it: an
HDF5 attribute ``num_classes`` (on the file or on the labels) or an npz array
``num_classes``. Integer images are scaled to [0, 1] (uint8 by 255, uint16 by
65535); float images are used as stored.

Everything a user can get wrong raises :class:`~ftdoctor.errors.FtdoctorError`
with a cause and a remedy.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ftdoctor import shapes
from ftdoctor.errors import DataError, FtdoctorError

SPLITS = ("train", "test")
NORMALIZATIONS = ("imagenet", "dataset", "none")
TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn")
DATASET_NAMES = ("shapes", "shapes:C", "fake") + TORCHVISION_NAMES
FILE_SUFFIXES = (".h5", ".hdf5", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAKE_SIZES = {"train": 1024, "test": 256}
FAKE_CLASSES = 10
FAKE_IMAGE_SIZE = 32

_STATS_BATCH = 256
_NAMES_HINT = ("use one of: shapes, shapes:C (C = 2 … 10), fake, "
               + ", ".join(TORCHVISION_NAMES)
               + "; a directory of images; or a .h5/.hdf5/.npz file")


@dataclass(frozen=True)
class DataOptions:
    """What ``--data`` and its companion flags ask for (SPEC §3, shared data options)."""

    data: str
    data_root: str | None = None
    download: bool = False
    split: str = "train"
    max_samples: int | None = 1024
    batch_size: int = 64
    image_size: int | None = None
    normalize: str = "imagenet"
    workers: int = 0
    seed: int = 0
    in_channels: int | None = None


@dataclass
class DataBundle:
    """One split, ready to iterate; item ``i`` is ``(x, y, i)``."""

    dataset: Dataset
    name: str
    split: str
    num_samples: int
    num_classes: int
    image_shape: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)
    batch_size: int = 64
    workers: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def labels(self) -> Tensor:
        """The labels of the (capped) split, int64, in dataset order."""
        return self.dataset.labels

    def loader(self, batch_size: int | None = None, shuffle: bool = False, seed: int = 0,
               sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
        """Batches ``(x[B,C,H,W] float32, y[B] int64, idx[B] int64)``.

        Dataset order without ``shuffle``; with it, a permutation drawn from a
        ``torch.Generator`` seeded with ``seed``. A ``sampler`` (e.g. a
        ``DistributedSampler``) replaces both.
        """
        size = self.batch_size if batch_size is None else batch_size
        _check_positive(size, "batch size", "--batch-size")
        if sampler is not None and shuffle:
            raise ValueError("pass either a sampler or shuffle=True, not both")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.dataset, batch_size=size, shuffle=shuffle, sampler=sampler,
                          generator=generator, num_workers=self.workers, drop_last=drop_last)


def default_data_root() -> str:
    """``$FTDOCTOR_DATA`` or ``~/.cache/ftdoctor/data``."""
    return os.environ.get("FTDOCTOR_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "ftdoctor", "data")


# --------------------------------------------------------------------------- sources
# A source is one capped split of raw images: ``read(indices)`` gives float32
# C×H×W tensors (stacked when they share a size, else a list), ``labels`` the
# int64 labels, ``num_classes`` the class count.

class _ShapesSource:
    def __init__(self, num_classes: int, split: str, seed: int, size: int | None) -> None:
        self.shapes = shapes.ShapesDataset(num_classes, split, seed, size)
        self.num_classes = num_classes
        self.labels = self.shapes.targets

    def read(self, indices: Sequence[int]) -> Tensor:
        return self.shapes.render(indices)[0]


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 over their sequence)."""
    z = 0x9E3779B97F4A7C15
    for part in parts:
        z = (z + (part & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


class _FakeSource:
    """Uniform noise images; image ``i`` is seeded by (seed, split, i), labels by (seed, split)."""

    def __init__(self, split: str, seed: int, size: int, count: int) -> None:
        self.split_tag = SPLITS.index(split) + 1
        self.seed = seed
        self.size = size
        self.num_classes = FAKE_CLASSES
        generator = torch.Generator().manual_seed(_derive_seed(seed, self.split_tag, -1))
        self.labels = torch.randint(0, FAKE_CLASSES, (FAKE_SIZES[split],), generator=generator)[:count]

    def read(self, indices: Sequence[int]) -> Tensor:
        out = torch.empty(len(indices), 3, self.size, self.size)
        generator = torch.Generator()
        for row, i in enumerate(indices):
            generator.manual_seed(_derive_seed(self.seed, self.split_tag, int(i)))
            torch.rand(3, self.size, self.size, generator=generator, out=out[row])
        return out


def _to_chw_float(block: np.ndarray, layout: str) -> Tensor:
    """A batch of stored images -> float32 (n, C, H, W); integers scaled to [0, 1]."""
    if layout == "NHW":
        block = block[:, None]
    elif layout == "NHWC":
        block = block.transpose(0, 3, 1, 2)
    if block.dtype == np.uint8:
        out = block.astype(np.float32) / np.float32(255.0)
    elif block.dtype == np.uint16:
        out = block.astype(np.float32) / np.float32(65535.0)
    else:
        out = block.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out))


class _ArraySource:
    """Images held in memory (npz, torchvision arrays), capped."""

    def __init__(self, images: np.ndarray, layout: str, labels: np.ndarray, num_classes: int) -> None:
        self.images = images
        self.layout = layout
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes

    def read(self, indices: Sequence[int]) -> Tensor:
        return _to_chw_float(self.images[np.asarray(indices, dtype=np.int64)], self.layout)


class _HDF5Source:
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
            self._file = h5py.File(self.path, "r", locking=False)   # checked by _hdf5_source
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
        return _to_chw_float(block, self.layout)


class _FolderSource:
    """An ImageFolder, read image by image through PIL (:func:`_read_image`)."""

    def __init__(self, folder: "_Folder", count: int) -> None:
        self.folder = folder
        self.labels = torch.as_tensor(folder.targets[:count], dtype=torch.int64)
        self.num_classes = len(folder.classes)

    def read(self, indices: Sequence[int]) -> list[Tensor]:
        from torchvision.transforms.functional import pil_to_tensor

        return [pil_to_tensor(_read_image(self.folder.samples[int(i)][0])).float().div_(255.0) for i in indices]

    def first_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the first image, from its header (images are read as RGB)."""
        width, height = _read_image(self.folder.samples[0][0], header_only=True)
        return 3, height, width


# What PIL may decode in an image folder: the formats of torchvision's IMG_EXTENSIONS, nothing else.
_PIL_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")


def _read_image(path: str, header_only: bool = False) -> Any:
    """One image as RGB: a regular file, one of :data:`_PIL_FORMATS`, its size checked before decoding
    (``header_only``: just its (width, height))."""
    from PIL import Image

    from ftdoctor.safety import check_image_pixels, open_regular

    try:
        with open_regular(path, "the image") as f, Image.open(f, formats=_PIL_FORMATS) as image:
            width, height = image.size
            check_image_pixels(height, width, f"the image {path}")
            return (width, height) if header_only else image.convert("RGB")
    except FtdoctorError as exc:
        raise DataError(exc.cause, exc.remedy) from None
    except Exception as exc:  # PIL raises many types for a bad file  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {exc}", "remove or replace the file") from None


@dataclass
class _Folder:
    """An ImageFolder's listing: ``samples`` (path, class index) in torchvision's order, ``classes`` sorted."""

    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _folder_samples(directory: Path, classes: list[str]) -> list[tuple[str, int]]:
    """torchvision's ``make_dataset`` order (classes sorted; per class ``sorted(os.walk(followlinks=True))``,
    file names sorted), but never entering a directory twice (a symlink loop) and refusing an image
    entry that is not a regular file (a FIFO or device would hang the reader)."""
    from ftdoctor.safety import not_regular

    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        top = directory / name
        if not top.is_dir():
            continue
        seen: set[tuple[int, int]] = set()
        listing: list[tuple[str, list[os.DirEntry]]] = []
        stack = [str(top)]
        while stack:
            here = stack.pop()
            info = os.stat(here)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(here) as it:
                entries = list(it)
            listing.append((here, [e for e in entries if not e.is_dir()]))
            stack.extend(os.path.join(here, e.name) for e in entries if e.is_dir())
        for here, files in sorted(listing, key=lambda item: item[0]):
            for entry in sorted(files, key=lambda e: e.name):
                if not entry.name.lower().endswith(_IMG_EXTENSIONS):
                    continue
                if not entry.is_file():
                    try:
                        mode = os.stat(entry.path).st_mode
                    except OSError:
                        raise FtdoctorError(f"the image {entry.path} is a broken link",
                                            "remove it or point it at an image") from None
                    raise not_regular(entry.path, mode, "the image")
                samples.append((entry.path, index))
    return samples


# --------------------------------------------------------------------------- the dataset

class PreparedDataset(Dataset):
    """A capped split with its transforms: item ``i`` -> ``(x, y, i)``.

    ``x`` is resized to ``resize_to`` (where it differs), adapted from
    ``channels_from`` to ``channels_to`` channels (grey repeated to RGB, RGB
    averaged to grey) and normalised by ``mean`` / ``std`` per channel.
    ``__getitems__`` prepares a whole batch at once; a DataLoader uses it.
    """

    def __init__(self, source: Any, resize_to: tuple[int, int] | None = None,
                 channels_from: int | None = None, channels_to: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.source = source
        self.resize_to = resize_to
        self.channels_from = channels_from
        self.channels_to = channels_to
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def labels(self) -> Tensor:
        return self.source.labels

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def __len__(self) -> int:
        return len(self.source.labels)

    def _indices(self, indices: Sequence[int]) -> list[int]:
        n = len(self)
        out = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        if any(i < 0 or i >= n for i in out):
            raise IndexError(f"index out of range for a dataset of {n} items")
        return out

    def prepare(self, indices: Sequence[int], normalize: bool = True) -> Tensor:
        """Transformed images (n, C, H, W) of the given items."""
        raw = self.source.read(indices)
        if isinstance(raw, list):
            x = torch.stack([self._resize(item[None])[0] for item in raw]) if raw else torch.empty(0)
        else:
            x = self._resize(raw)
        if self.channels_from != self.channels_to and self.channels_to is not None:
            x = x.expand(-1, 3, -1, -1).contiguous() if self.channels_to == 3 else x.mean(1, keepdim=True)
        if normalize and self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def _resize(self, x: Tensor) -> Tensor:
        if self.resize_to is None or tuple(x.shape[-2:]) == self.resize_to:
            return x
        return F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False,
                             antialias=True)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        (i,) = self._indices([index])
        return self._prepared([i])[0], int(self.labels[i]), i

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int, int]]:
        idx = self._indices(indices)
        x = self._prepared(idx)
        labels = self.labels
        return [(x[row], int(labels[i]), i) for row, i in enumerate(idx)]

    def _prepared(self, indices: Sequence[int]) -> Tensor:
        try:
            return self.prepare(indices)
        except FtdoctorError as exc:
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:   # in a --workers process: carry the cause to the main one
                from ftdoctor.errors import CarriedError
                raise CarriedError.carry(exc) from None
            raise


# --------------------------------------------------------------------------- load_data

def load_data(opts: DataOptions) -> DataBundle:
    """Resolve ``opts.data`` and build the capped, transformed split (see the module doc)."""
    _check_options(opts)
    notes: list[str] = []
    source, name, resize_default = _open_source(opts)
    count = len(source.labels)
    if count == 0:
        raise FtdoctorError(f"{name} has no samples in its {opts.split} split",
                            "point --data at a dataset with at least one image")
    if source.num_classes < 2:
        raise FtdoctorError(f"{name} has a single class: a classifier's diagnoses need at least two",
                            "point --data at a dataset with two or more classes (labels 0 … C−1)")
    _check_labels(source.labels, source.num_classes, name)

    if hasattr(source, "first_shape"):
        channels, height, width = source.first_shape()     # from the file's header: nothing decoded yet
    else:
        first = source.read([0])
        first = first[0] if isinstance(first, list) else first[0]
        channels, height, width = (int(s) for s in first.shape)
    resize_to = (opts.image_size, opts.image_size) if opts.image_size else resize_default
    if resize_to is None and isinstance(source, _FolderSource):
        resize_to = (height, width)
        notes.append(f"images resized to {height}×{width} (the first image's size) where they "
                     "differ; --image-size chooses the size")
    channels_to = _adapt_channels(channels, opts.in_channels, notes)
    from ftdoctor.safety import check_batch_bytes

    out_size = resize_to if resize_to is not None else (height, width)
    check_batch_bytes(opts.batch_size, (channels_to or channels, *out_size), f"images from {name}")

    dataset = PreparedDataset(source, resize_to, channels, channels_to)
    out_channels = channels_to if channels_to is not None else channels
    mean, std = _normalization(opts.normalize, dataset, out_channels, notes)
    if mean is not None:
        dataset.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        dataset.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out_h, out_w = resize_to if resize_to is not None else (height, width)
    return DataBundle(dataset=dataset, name=name, split=opts.split, num_samples=count,
                      num_classes=int(source.num_classes),
                      image_shape=(out_channels, int(out_h), int(out_w)), notes=notes,
                      batch_size=opts.batch_size, workers=opts.workers,
                      mean=tuple(mean) if mean is not None else (),
                      std=tuple(std) if std is not None else ())


def input_paths(data: str | None, data_root: str | None = None) -> list[Path]:
    """The files or directories ``--data`` reads (none for the built-in sets): no output may land on them."""
    if not data:
        return []
    key = data.strip().lower().replace("_", "-")
    if key == "shapes" or key.startswith("shapes:") or key == "fake":
        return []
    if key in TORCHVISION_NAMES:
        root = os.path.abspath(os.path.expanduser(data_root or default_data_root()))
        where = _TORCHVISION[key][1]
        return [Path(root) / where.format(split=s) for s in SPLITS] if "{" in where else [Path(root) / where]
    return [Path(data).expanduser()]


def _check_positive(value: Any, what: str, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise FtdoctorError(f"the {what} must be a positive integer, got {value!r}",
                            f"pass {flag} with a value of at least 1")


def _check_options(opts: DataOptions) -> None:
    _check_positive(opts.batch_size, "batch size", "--batch-size")
    if opts.max_samples is not None:
        _check_positive(opts.max_samples, "sample cap", "--max-samples")
    if opts.image_size is not None:
        _check_positive(opts.image_size, "image size", "--image-size")
    if opts.in_channels is not None:
        _check_positive(opts.in_channels, "model's input channel count", "in_channels")
    if isinstance(opts.workers, bool) or not isinstance(opts.workers, (int, np.integer)) or opts.workers < 0:
        raise FtdoctorError(f"the worker count must be 0 or more, got {opts.workers!r}",
                            "pass --workers 0 to load in the main process")
    if opts.split not in SPLITS:
        raise FtdoctorError(f"unknown split {opts.split!r}", f"use --split {' or '.join(SPLITS)}")
    if opts.normalize not in NORMALIZATIONS:
        raise FtdoctorError(f"unknown normalization {opts.normalize!r}",
                            f"use --normalize with one of: {', '.join(NORMALIZATIONS)}")
    if not isinstance(opts.data, str) or not opts.data.strip():
        raise FtdoctorError("no data was given", f"pass --data: {_NAMES_HINT}")


def _cap(total: int, max_samples: int | None) -> int:
    return total if max_samples is None else min(total, max_samples)


def _open_source(opts: DataOptions) -> tuple[Any, str, tuple[int, int] | None]:
    """(source, display name, default resize) for ``opts.data``."""
    data = opts.data.strip()
    key = data.lower()
    if key == "shapes" or key.startswith("shapes:"):
        num_classes = _parse_shapes_classes(data)
        cap = _cap(shapes.SPLIT_SIZES[opts.split], opts.max_samples)
        return _ShapesSource(num_classes, opts.split, opts.seed, cap), data, None
    if key == "fake":
        size = opts.image_size or FAKE_IMAGE_SIZE
        cap = _cap(FAKE_SIZES[opts.split], opts.max_samples)
        return _FakeSource(opts.split, opts.seed, size, cap), data, None
    if key.replace("_", "-") in TORCHVISION_NAMES:
        return _torchvision_source(key.replace("_", "-"), opts), key.replace("_", "-"), None

    path = Path(data).expanduser()
    if path.is_dir():
        return _folder_source(path, opts), data, None
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES or (os.path.exists(path) and not path.is_file()):
        if not os.path.exists(path):
            raise FtdoctorError(f"data file not found: {path}",
                                "check the path (relative paths start at the working directory)")
        from ftdoctor.safety import regular_file
        regular_file(path, "the data file")   # a FIFO or device: refused before it is opened
        if suffix == ".npz":
            return _npz_source(path, opts), data, None
        return _hdf5_source(path, opts), data, None
    if path.exists():
        raise FtdoctorError(f"cannot use {path} as data: unknown file type {path.suffix!r}",
                            _NAMES_HINT)
    if os.sep in data or (os.altsep and os.altsep in data) or path.suffix:
        raise FtdoctorError(f"data not found: {path}", "check the path, or " + _NAMES_HINT)
    raise FtdoctorError(f"unknown data {data!r}", _NAMES_HINT)


def _parse_shapes_classes(data: str) -> int:
    _, _, count = data.partition(":")
    if not count:
        return shapes.DEFAULT_CLASSES
    try:
        num_classes = int(count)
    except ValueError:
        raise FtdoctorError(f"{data!r}: the class count after 'shapes:' must be an integer",
                            f"use shapes:C with C = {shapes.MIN_CLASSES} … {shapes.MAX_CLASSES}") from None
    shapes.check_num_classes(num_classes)
    return num_classes


# torchvision class, folder it reads (relative to the root), class count
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "mnist": ("MNIST", os.path.join("MNIST", "raw"), 10),
    "fashion-mnist": ("FashionMNIST", os.path.join("FashionMNIST", "raw"), 10),
    "svhn": ("SVHN", "{split}_32x32.mat", 10),
}


def _str_keys(entry: object) -> object:
    """Python 3 re-exports of the CIFAR pickles have bytes keys and values where the originals have str."""
    if isinstance(entry, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    return entry


def _cifar_entry(path: str, keys: tuple[str, ...]) -> dict:
    """One CIFAR batch or meta pickle, read by :class:`~ftdoctor.safety.DataUnpickler` (no code runs)."""
    from ftdoctor.safety import load_data_pickle

    entry = _str_keys(load_data_pickle(path, remedy="re-fetch the dataset with --download, or point --data-root "
                                                    "at a good copy"))
    if not isinstance(entry, dict) or not any(k in entry for k in keys):
        raise FtdoctorError(f"{path} is not a CIFAR file: it lacks {' or '.join(map(repr, keys))}",
                            "re-fetch the dataset with --download, or point --data-root at a good copy")
    return entry


def _cifar_class(base: type) -> type:
    """torchvision's CIFAR class, reading its files without pickle's code execution or the md5 check.

    torchvision reads CIFAR's batch and meta files with ``pickle.load``, which
    runs any code a file asks for, and checks every file's md5 even when it
    will not download — a guard for downloads that also rejects re-exported or
    trimmed copies. This subclass lets torchvision download (``--download``,
    md5-checked as before) but reads the files itself, with torchvision's
    layout and a restricted unpickler (:func:`ftdoctor.safety.load_data_pickle`).
    """
    from torchvision.datasets.vision import VisionDataset

    class Cifar(base):  # type: ignore[misc, valid-type]
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            VisionDataset.__init__(self, root)
            self.train = train
            if download:
                self.download()
            if not self._present():
                raise RuntimeError("Dataset not found or corrupted.")
            data, targets = [], []
            for file_name, _ in (self.train_list if train else self.test_list):
                entry = _cifar_entry(os.path.join(self.root, self.base_folder, file_name),
                                     ("labels", "fine_labels"))
                data.append(_cifar_images(entry.get("data"), file_name))
                labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
                targets.extend(int(v) for v in np.asarray(labels, dtype=np.int64).reshape(-1))
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            if len(targets) != len(self.data):
                raise FtdoctorError(f"{self.base_folder} has {len(self.data)} images but {len(targets)} labels",
                                    "re-fetch the dataset with --download")
            self.targets = targets
            meta = _cifar_entry(os.path.join(self.root, self.base_folder, self.meta["filename"]),
                                (self.meta["key"],))
            self.classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[self.meta["key"]]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        def _present(self) -> bool:
            from ftdoctor.safety import is_regular

            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(is_regular(os.path.join(self.root, self.base_folder, f)) for f in names)

    Cifar.__name__ = Cifar.__qualname__ = base.__name__
    return Cifar


def _cifar_images(data: object, name: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise FtdoctorError(f"the CIFAR file {name} holds {type(data).__name__} {shape} as 'data', not "
                            "N×3072 uint8 images", "re-fetch the dataset with --download")
    return data


def _torchvision_source(name: str, opts: DataOptions) -> _ArraySource:
    import torchvision.datasets as tvd

    class_name, where, num_classes = _TORCHVISION[name]
    root = os.path.abspath(os.path.expanduser(opts.data_root or default_data_root()))
    looked_in = os.path.join(root, where.format(split=opts.split))
    cls = getattr(tvd, class_name)
    if name in ("cifar10", "cifar100"):
        cls = _cifar_class(cls)
    try:
        if name == "svhn":
            ds = cls(root, split=opts.split, download=opts.download)
        else:
            ds = cls(root, train=opts.split == "train", download=opts.download)
    except FtdoctorError:
        raise
    except ImportError as exc:
        missing = exc.name or "a package"
        raise FtdoctorError(f"reading {name} needs the Python package {missing}",
                            f"pip install {missing}") from exc
    except Exception as exc:  # torchvision raises RuntimeError, but a bad file can raise anything
        if opts.download:
            raise FtdoctorError(f"could not download {name} into {root}: {exc}",
                                "check the network connection, or copy the files into "
                                f"{looked_in} and run without --download") from exc
        if not os.path.exists(looked_in):
            raise FtdoctorError(f"{name} not found: looked in {looked_in}",
                                "pass --download to fetch it, or --data-root DIR for a "
                                "directory that holds it") from exc
        raise FtdoctorError(f"{name} files in {looked_in} are incomplete or corrupted: {exc}",
                            "re-fetch them with --download, or point --data-root at a "
                            "good copy") from exc

    if name == "svhn":
        images, layout, labels = ds.data, "NCHW", np.asarray(ds.labels)
    elif name in ("mnist", "fashion-mnist"):
        images, layout, labels = ds.data.numpy(), "NHW", ds.targets.numpy()
    else:
        images, layout, labels = np.asarray(ds.data), "NHWC", np.asarray(ds.targets)
        num_classes = len(getattr(ds, "classes", ())) or num_classes
    cap = _cap(len(labels), opts.max_samples)
    # copies, so the rest of the split is freed
    return _ArraySource(np.array(images[:cap]), layout, np.array(labels[:cap]), num_classes)


def _folder_source(root: Path, opts: DataOptions) -> _FolderSource:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs:
        if opts.split not in split_dirs:
            raise FtdoctorError(f"{root} has no {opts.split} split: it has {', '.join(split_dirs)}/ only",
                                f"use --split {' or '.join(split_dirs)}, or add {root / opts.split}/")
    elif opts.split != "train":
        raise FtdoctorError(f"{root} has only a train split (it has no train/ and test/ subfolders)",
                            "use --split train, or arrange the images as DIR/train/CLASS/* and "
                            "DIR/test/CLASS/*")
    folder_of = {s: split_dirs.get(s, root) for s in SPLITS}
    layout_hint = "arrange the images as DIR/CLASS/IMAGE (ImageFolder layout)"

    def class_dirs(path: Path) -> list[str]:
        with os.scandir(path) as it:
            return sorted(entry.name for entry in it if entry.is_dir())

    try:
        classes = class_dirs(folder_of["train"])   # class indices fixed by the train split, so test agrees
        if not classes:
            raise FtdoctorError(f"{folder_of['train']} has no class subfolders", layout_hint)
        directory = folder_of[opts.split]
        extra = sorted(set(class_dirs(directory)) - set(classes))
        if extra:
            raise FtdoctorError(f"{directory} has classes the train split lacks: {', '.join(extra)}",
                                "give both splits the same class folders")
        samples = _folder_samples(directory, classes)
    except OSError as exc:
        raise FtdoctorError(f"cannot read {root} as an image folder: {exc}", layout_hint) from None
    return _FolderSource(_Folder(classes, samples), _cap(len(samples), opts.max_samples))


def _image_layout(shape: tuple[int, ...], dtype: np.dtype, what: str) -> str:
    """Decide NHW / NHWC / NCHW from the shape (a channel dim of 1 or 3) and the dtype."""
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise FtdoctorError(f"{what} has non-numeric dtype {dtype}",
                            "store images as uint8 (N×H×W×C) or float (N×C×H×W)")
    if np.issubdtype(dtype, np.complexfloating):
        raise FtdoctorError(f"{what} holds complex numbers ({dtype})",
                            "store real-valued images: uint8 (N×H×W×C) or float (N×C×H×W)")
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if first and last:  # e.g. 3×3 images: go by the documented convention
            return "NCHW" if np.issubdtype(dtype, np.floating) else "NHWC"
        if last:
            return "NHWC"
        if first:
            return "NCHW"
    raise FtdoctorError(f"{what} has shape {tuple(shape)}: cannot tell images from it",
                        "store images as N×H×W×C (uint8), N×C×H×W (float) with C = 1 or 3, "
                        "or N×H×W (grey)")


def _as_labels(values: np.ndarray, what: str) -> np.ndarray:
    """Class indices as int64; a column vector is flattened; fractions are refused."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise FtdoctorError(f"{what} has shape {values.shape}: labels must be one class index per image",
                            "store labels as a 1-D array of integers (not one-hot)")
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating):
        if values.size and not (np.isfinite(values).all() and (values == np.round(values)).all()):
            raise FtdoctorError(f"{what} holds non-integer values", "store labels as class indices 0 … C−1")
        return values.astype(np.int64)
    raise FtdoctorError(f"{what} has dtype {values.dtype}: labels must be integers",
                        "store labels as class indices 0 … C−1")


def _stated_classes(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        number = np.asarray(value).reshape(())
        count = int(number)
        whole = bool(number == count)
    except (TypeError, ValueError, OverflowError):
        raise FtdoctorError(f"{what} is not a single integer", "store num_classes as one integer") from None
    if not whole:
        raise FtdoctorError(f"{what} is {number}, not a whole number", "store num_classes as one integer")
    if count <= 0:
        raise FtdoctorError(f"{what} is {count}", "store a positive num_classes, or none at all")
    return count


def _file_classes(label_arrays: list[np.ndarray], stated: int | None, what: str = "the data") -> int:
    from ftdoctor.safety import check_class_count

    if stated is not None:
        return check_class_count(stated, what)
    highest = max((int(a.max()) for a in label_arrays if a.size), default=-1)
    return check_class_count(max(highest + 1, 1), f"the largest label of {what} ({highest})")


def _npz_source(path: Path, opts: DataOptions) -> _ArraySource:
    """Headers first (shapes, dtypes), then only the capped rows of the images: :mod:`ftdoctor.npz`."""
    from ftdoctor.npz import NpzArchive
    from ftdoctor.safety import MAX_IN_MEMORY_BYTES, MAX_LABEL_BYTES

    keys = {"train": ("x", "y"), "test": ("x_test", "y_test")}
    with NpzArchive(path) as archive:
        names = list(archive.files)
        x_key, y_key = keys[opts.split]
        if x_key not in names or y_key not in names:
            if opts.split == "test" and "x" in names:
                raise FtdoctorError(f"{path} has no test split (arrays x_test, y_test): it has train only",
                                    "use --split train, or add x_test and y_test to the file")
            raise FtdoctorError(f"{path} lacks the arrays {x_key!r} and/or {y_key!r}; it has: "
                                f"{', '.join(names) or 'nothing'}",
                                "write it with numpy.savez(path, x=images, y=labels)")
        head = archive.header(x_key)
        layout = _image_layout(head.shape, head.dtype, f"{path}:{x_key}")
        _check_image_shape(head.shape, layout, f"{path}:{x_key}")
        labels = _as_labels(archive.read(y_key, limit=MAX_LABEL_BYTES), f"{path}:{y_key}")
        if head.shape[0] != len(labels):
            raise FtdoctorError(f"{path}: {x_key} has {head.shape[0]} images but {y_key} has {len(labels)} labels",
                                "store one label per image")
        other = [k for k in ("y", "y_test") if k in names and k != y_key]
        all_labels = [labels] + [_as_labels(archive.read(k, limit=MAX_LABEL_BYTES), f"{path}:{k}") for k in other]
        stated = _stated_classes(archive.read("num_classes", limit=64) if "num_classes" in names else None,
                                 f"{path}:num_classes")
        cap = _cap(len(labels), opts.max_samples)
        images = archive.read(x_key, cap, limit=MAX_IN_MEMORY_BYTES)
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise FtdoctorError(f"{path}:{x_key} holds NaN or infinite values",
                            "clean the images before probing")
    return _ArraySource(images, layout, labels[:cap], _file_classes(all_labels, stated, str(path)))


def _check_image_shape(shape: tuple[int, ...], layout: str, what: str) -> None:
    """One stored image may not exceed :data:`~ftdoctor.safety.MAX_IMAGE_PIXELS`."""
    from ftdoctor.safety import check_image_pixels

    height, width = {"NHW": (1, 2), "NHWC": (1, 2), "NCHW": (2, 3)}[layout]
    check_image_pixels(int(shape[height]), int(shape[width]), f"each image of {what}")


def _hdf5_source(path: Path, opts: DataOptions) -> _HDF5Source:
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
                    label_sets[k] = _as_labels(h5safe.read_whole(ds, f"{path}:{k}", MAX_LABEL_BYTES),
                                               f"{path}:{k}")
            stated = handle.attrs.get("num_classes", handle[y_key].attrs.get("num_classes"))
        except FtdoctorError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: h5py raises many types
            raise FtdoctorError(f"cannot read the datasets of {path}: {exc}",
                                "check that the file is complete") from None
    layout = _image_layout(shape, dtype, f"{path}:{x_key}")
    _check_image_shape(shape, layout, f"{path}:{x_key}")
    from ftdoctor.safety import check_batch_bytes
    # the stored rows of one batch, before their float32 copy (float64 images take twice that)
    check_batch_bytes(opts.batch_size, shape[1:], f"stored images of {path}", itemsize=dtype.itemsize)
    labels = label_sets[y_key]
    if shape[0] != len(labels):
        raise FtdoctorError(f"{path}: {x_key} has {shape[0]} images but {y_key} has {len(labels)} labels",
                            "store one label per image")
    cap = _cap(len(labels), opts.max_samples)
    num_classes = _file_classes(list(label_sets.values()), _stated_classes(stated, f"{path}: num_classes"),
                                str(path))
    return _HDF5Source(str(path), x_key, layout, labels[:cap], num_classes)


def _check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        bad = int((labels < 0).nonzero()[0, 0])
        raise FtdoctorError(f"{name}: label {low} is negative (first at item {bad})",
                            "labels must be class indices 0 … C−1")
    if high >= num_classes:
        bad = int((labels >= num_classes).nonzero()[0, 0])
        raise FtdoctorError(f"{name}: label {high} is out of range for {num_classes} classes "
                            f"(first at item {bad})",
                            f"labels must be class indices 0 … {num_classes - 1}")


def _adapt_channels(channels: int, in_channels: int | None, notes: list[str]) -> int | None:
    if in_channels is None or in_channels == channels:
        return None
    if (channels, in_channels) == (1, 3):
        notes.append("grey images repeated to 3 channels for the model's first layer")
        return 3
    if (channels, in_channels) == (3, 1):
        notes.append("RGB images averaged to 1 grey channel for the model's first layer")
        return 1
    raise FtdoctorError(f"the data has {channels} channels but the model's first layer takes {in_channels}",
                        "only grey (1) <-> RGB (3) is adapted: use data with "
                        f"{in_channels} channels or a matching model")


def _normalization(mode: str, dataset: PreparedDataset, channels: int,
                   notes: list[str]) -> tuple[list[float] | None, list[float] | None]:
    if mode == "none":
        return None, None
    if mode == "imagenet":
        if channels == 3:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        if channels == 1:
            notes.append("grey images normalised with the mean of ImageNet's channel statistics")
            return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
        raise FtdoctorError(f"ImageNet normalisation needs 1 or 3 channels, the data has {channels}",
                            "pass --normalize dataset or --normalize none")
    mean, std = dataset_statistics(dataset)
    for c, s in enumerate(std):
        if s == 0.0:
            notes.append(f"channel {c} is constant over the split: centred but not scaled")
    std = [s if s > 0.0 else 1.0 for s in std]
    notes.append("normalised with the split's own per-channel mean "
                 f"({', '.join(f'{m:.4f}' for m in mean)}) and std ({', '.join(f'{s:.4f}' for s in std)})")
    return mean, std


def dataset_statistics(dataset: PreparedDataset, batch: int = _STATS_BATCH) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of the un-normalised images, streamed in float64.

    Sums are taken about the first batch's channel means (a shifted-data
    variance), so a constant channel gets a std of exactly 0.
    """
    from ftdoctor import progress

    shift = total = total_sq = None
    count = 0
    with progress.task("normalisation statistics", total=len(dataset), unit="images") as bar:
        for start in range(0, len(dataset), batch):
            x = dataset.prepare(range(start, min(start + batch, len(dataset))), normalize=False).double()
            if not torch.isfinite(x).all():
                raise FtdoctorError("the images hold NaN or infinite values",
                                    "clean the data, or pass --normalize none to see them in the probes")
            if shift is None:
                shift = x.mean(dim=(0, 2, 3))
                total = torch.zeros_like(shift)
                total_sq = torch.zeros_like(shift)
            d = x - shift.view(1, -1, 1, 1)
            total += d.sum(dim=(0, 2, 3))
            total_sq += d.square().sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
            bar.advance(x.shape[0])
    mean_d = total / count
    var = (total_sq / count - mean_d.square()).clamp_min(0.0)
    return [float(m) for m in shift + mean_d], [math.sqrt(float(v)) for v in var]
