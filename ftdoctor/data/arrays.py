"""What the file-based data sources share: image layouts, labels, class counts, the in-memory split.

A *split* is what a data source opens: ``labels`` (int64, capped to
``--max-samples``), ``num_classes``, and ``read(indices)`` giving float32
C×H×W images in [0, 1] for integer files (stacked when they share a size,
else a list).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ftdoctor.errors import FtdoctorError


def capped(total: int, max_samples: int | None) -> int:
    return total if max_samples is None else min(total, max_samples)


def to_chw_float(block: np.ndarray, layout: str) -> Tensor:
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


class ArraySplit:
    """Images held in memory (npz, torchvision arrays), capped."""

    def __init__(self, images: np.ndarray, layout: str, labels: np.ndarray, num_classes: int) -> None:
        self.images = images
        self.layout = layout
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes

    def select(self, indices: np.ndarray) -> "ArraySplit":
        """Only the rows ``indices`` (a subset keeps no copy of the rest)."""
        return ArraySplit(np.ascontiguousarray(self.images[indices]), self.layout, self.labels.numpy()[indices],
                          self.num_classes)

    def read(self, indices: Sequence[int]) -> Tensor:
        return to_chw_float(self.images[np.asarray(indices, dtype=np.int64)], self.layout)


def image_layout(shape: tuple[int, ...], dtype: np.dtype, what: str) -> str:
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


def check_image_shape(shape: tuple[int, ...], layout: str, what: str) -> None:
    """One stored image may not exceed :data:`~ftdoctor.safety.MAX_IMAGE_PIXELS`."""
    from ftdoctor.safety import check_image_pixels

    height, width = {"NHW": (1, 2), "NHWC": (1, 2), "NCHW": (2, 3)}[layout]
    check_image_pixels(int(shape[height]), int(shape[width]), f"each image of {what}")


def as_labels(values: np.ndarray, what: str) -> np.ndarray:
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


def stated_classes(value: Any, what: str) -> int | None:
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


def file_classes(label_arrays: list[np.ndarray], stated: int | None, what: str = "the data") -> int:
    from ftdoctor.safety import check_class_count

    if stated is not None:
        return check_class_count(stated, what)
    highest = max((int(a.max()) for a in label_arrays if a.size), default=-1)
    return check_class_count(max(highest + 1, 1), f"the largest label of {what} ({highest})")


def check_labels(labels: Tensor, num_classes: int, name: str) -> None:
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
