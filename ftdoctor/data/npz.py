"""``.npz`` data: arrays ``x``, ``y`` (``x_test``, ``y_test`` for the test split), read header first
(:mod:`.npzfile`): only the rows ``--max-samples`` needs are decompressed."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ftdoctor.data.arrays import (ArraySplit, as_labels, capped, check_image_shape, file_classes, image_layout,
                                  stated_classes)
from ftdoctor.data.sources import PathSource, register_data_source

if TYPE_CHECKING:
    from ftdoctor.data.bundle import DataOptions

from ftdoctor.errors import FtdoctorError


def npz_split(path: Path, opts: DataOptions) -> ArraySplit:
    """Headers first (shapes, dtypes), then only the capped rows of the images: :mod:`ftdoctor.data.npzfile`."""
    from ftdoctor.data.npzfile import NpzArchive
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
        layout = image_layout(head.shape, head.dtype, f"{path}:{x_key}")
        check_image_shape(head.shape, layout, f"{path}:{x_key}")
        labels = as_labels(archive.read(y_key, limit=MAX_LABEL_BYTES), f"{path}:{y_key}")
        if head.shape[0] != len(labels):
            raise FtdoctorError(f"{path}: {x_key} has {head.shape[0]} images but {y_key} has {len(labels)} labels",
                                "store one label per image")
        other = [k for k in ("y", "y_test") if k in names and k != y_key]
        all_labels = [labels] + [as_labels(archive.read(k, limit=MAX_LABEL_BYTES), f"{path}:{k}") for k in other]
        stated = stated_classes(archive.read("num_classes", limit=64) if "num_classes" in names else None,
                                 f"{path}:num_classes")
        classes = file_classes(all_labels, stated, str(path))
        if opts.max_samples is None and len(labels) > 0:
            # uncapped: a subset may be drawn (data.subset) -- then only its rows are decompressed
            return LazyNpzSplit(path, x_key, layout, labels, classes)
        cap = capped(len(labels), opts.max_samples)
        images = archive.read(x_key, cap, limit=MAX_IN_MEMORY_BYTES)
    return ArraySplit(_finite(images, path, x_key), layout, labels[:cap], classes)


def _finite(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise FtdoctorError(f"{path}:{key} holds NaN or infinite values", "clean the images before probing")
    return images


class LazyNpzSplit:
    """An ``.npz`` split whose images are decompressed only when asked: the rows of a drawn subset
    (:meth:`select`, streamed), or all of them at the first :meth:`read`."""

    def __init__(self, path: Path, key: str, layout: str, labels: np.ndarray, num_classes: int) -> None:
        self.path, self.key, self.layout = path, key, layout
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes
        self._all: ArraySplit | None = None

    def _rows(self, at: np.ndarray | None) -> np.ndarray:
        from ftdoctor.data.npzfile import NpzArchive
        from ftdoctor.safety import MAX_IN_MEMORY_BYTES

        with NpzArchive(self.path) as archive:
            return _finite(archive.read(self.key, limit=MAX_IN_MEMORY_BYTES, at=at), self.path, self.key)

    def select(self, indices: np.ndarray) -> ArraySplit:
        return ArraySplit(self._rows(np.asarray(indices)), self.layout, self.labels.numpy()[indices], self.num_classes)

    def read(self, indices: Any) -> Any:
        if self._all is None:
            self._all = ArraySplit(self._rows(None), self.layout, self.labels.numpy(), self.num_classes)
        return self._all.read(indices)


@register_data_source(name="npz", priority=60, suffixes=(".npz",))
class NpzData(PathSource):
    def read(self, path: Path, opts: Any) -> Any:
        return npz_split(path, opts)
