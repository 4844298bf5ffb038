"""An image folder (``DIR/CLASS/IMAGE``, or ``DIR/train/…`` and ``DIR/test/…``), read image by image."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from ftdoctor.data.arrays import capped
from ftdoctor.data.sources import DataSource, register_data_source

if TYPE_CHECKING:
    from ftdoctor.data.bundle import DataOptions

from ftdoctor.errors import DataError, FtdoctorError

SPLITS = ("train", "test")


class FolderSplit:
    resize_to_first = True   # images of other sizes are resized to the first one's

    """An ImageFolder, read image by image through PIL (:func:`_read_image`)."""

    def __init__(self, folder: "_Folder", count: int) -> None:
        self.folder = folder
        self.labels = torch.as_tensor(folder.targets[:count], dtype=torch.int64)
        self.num_classes = len(folder.classes)
        self.class_names = list(folder.classes)

    def read(self, indices: Sequence[int]) -> list[Tensor]:
        from torchvision.transforms.functional import pil_to_tensor

        return [pil_to_tensor(read_image(self.folder.samples[int(i)][0])).float().div_(255.0) for i in indices]

    def first_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the first image, from its header (images are read as RGB)."""
        width, height = read_image(self.folder.samples[0][0], header_only=True)
        return 3, height, width

_PIL_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")


def read_image(path: str, header_only: bool = False) -> Any:
    """One image as RGB: a regular file, one of :data:`_PIL_FORMATS`, its size checked before decoding
    (``header_only``: just its (width, height))."""
    from ftdoctor.safety import open_regular

    try:
        with open_regular(path, "the image") as f:
            return _decode(f, f"the image {path}", header_only)
    except FtdoctorError as exc:
        raise DataError(exc.cause, exc.remedy) from None
    except Exception as exc:  # PIL raises many types for a bad file  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {exc}", "remove or replace the file") from None


def read_image_bytes(data: bytes, what: str, header_only: bool = False) -> Any:
    """:func:`read_image` for an encoded image held in memory (a ``datasets`` Image column)."""
    import io

    try:
        return _decode(io.BytesIO(data), what, header_only)
    except FtdoctorError as exc:
        raise DataError(exc.cause, exc.remedy) from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {what}: {exc}", "remove or replace the image") from None


def _decode(f: Any, what: str, header_only: bool) -> Any:
    from PIL import Image

    from ftdoctor.safety import check_image_pixels

    with Image.open(f, formats=_PIL_FORMATS) as image:
        width, height = image.size
        check_image_pixels(height, width, what)
        return (width, height) if header_only else image.convert("RGB")


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


def folder_split(root: Path, opts: DataOptions) -> FolderSplit:
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
    return FolderSplit(_Folder(classes, samples), capped(len(samples), opts.max_samples))


@register_data_source(name="folder", priority=40, suffixes=("/",))
class FolderData(DataSource):
    def claims(self, data: str) -> bool:
        return Path(data).expanduser().is_dir()

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        return folder_split(Path(data).expanduser(), opts), data
