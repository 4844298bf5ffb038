"""A split ready to iterate: capped, resized, channel-adapted, normalised (SPEC §3 "Data", §8).

:func:`load_data` turns ``--data`` and its companion options
(:class:`DataOptions`) into a :class:`DataBundle`: the data source that claims
``--data`` (:mod:`.sources`) opens one split, of which ``--max-samples`` keep a
seeded, class-stratified subset (or the first N: :mod:`.subset`);
:class:`PreparedDataset` resizes it,
adapts it to the model's input channels (grey repeated to RGB, RGB averaged
to grey) and normalises it. Item ``i`` is ``(x, y, i)`` — the index is the key
of per-example randomness (SPEC §1.2), so figures do not depend on batch
size, order or sharding. Everything a user can get wrong raises
:class:`~ftdoctor.errors.FtdoctorError` with a cause and a remedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ftdoctor.data.arrays import check_labels
from ftdoctor.data.sources import names_hint, open_split
from ftdoctor.data.subset import SUBSETS, Drawn, draw
from ftdoctor.errors import FtdoctorError

SPLITS = ("train", "test")

NORMALIZATIONS = ("imagenet", "inception", "dataset", "none")

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

_STATS_BATCH = 256


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
    subset: str = "stratified"         # how --max-samples draws: stratified | first (.subset)
    # tables and datasets folders (.columns) and text (.text)
    text_column: str | None = None     # "A" or "A,B" for sentence pairs
    label_column: str | None = None
    image_column: str | None = None
    max_length: int | None = None      # tokens per example
    tokenizer: str | None = None       # --tokenizer DIR; else the model folder's (model_folder)
    # set by the session from the model, never printed as flags
    model_folder: str | None = None
    class_names: tuple[str, ...] | None = None
    model_max_length: int | None = None
    model_takes_text: bool | None = None   # None: not known (the library's load_data)

    def flags(self) -> tuple[str, ...]:
        """The flags after ``--data DATA`` that give the same examples (defaults left out), for printed
        commands. ``--download`` is not repeated (the data is there by then), nor ``--workers`` (speed only)."""
        defaults = DataOptions(data=self.data)
        out: list[str] = []
        if self.data_root is not None:
            out += ["--data-root", str(self.data_root)]
        for name in ("split", "max_samples", "subset", "batch_size", "image_size", "normalize", "text_column",
                     "label_column", "image_column", "max_length", "tokenizer"):
            value = getattr(self, name)
            if value != getattr(defaults, name) and value is not None:
                out += ["--" + name.replace("_", "-"), str(value)]
        return tuple(out)


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
    drawn: Drawn | None = None          # how --max-samples chose the examples
    kind: str = "image"                 # "image", or "text": inputs are token ids and masks (.text)
    class_names: tuple[str, ...] | None = None   # the classes' names, when the data names them

    def resize(self, size: int) -> None:
        """Resize every image to ``size``×``size`` from now on (the model needs that size)."""
        from ftdoctor.safety import check_batch_bytes

        check_batch_bytes(self.batch_size, (self.image_shape[0], size, size), f"images from {self.name}")
        self.dataset.resize_to = (size, size)
        self.image_shape = (self.image_shape[0], size, size)

    def info(self, num_samples: int | None = None) -> dict[str, Any]:
        """The report's ``data`` block: name, split, examples (``num_samples``: those a run saw), classes,
        and how ``--max-samples`` drew them (``subset``, :class:`~ftdoctor.data.subset.Drawn`)."""
        return {"name": self.name, "split": self.split,
                "num_samples": self.num_samples if num_samples is None else num_samples,
                "num_classes": self.num_classes, "subset": self.drawn.to_json() if self.drawn else None}

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


def load_data(opts: DataOptions) -> DataBundle:
    """Resolve ``opts.data`` and build the capped, transformed split (see the module doc)."""
    _check_options(opts)
    notes: list[str] = []
    source, name = open_split(replace(opts, max_samples=None) if opts.subset == "stratified" else opts)
    notes.extend(getattr(source, "notes", ()))
    source, drawn = draw(source, opts.max_samples, opts.subset, opts.seed)
    count = len(source.labels)
    if count == 0:
        raise FtdoctorError(f"{name} has no samples in its {opts.split} split",
                            "point --data at a dataset with at least one image")
    if source.num_classes < 2:
        raise FtdoctorError(f"{name} has a single class: a classifier's diagnoses need at least two",
                            "point --data at a dataset with two or more classes (labels 0 … C−1)")
    check_labels(source.labels, source.num_classes, name)
    if getattr(source, "kind", "image") == "text":
        return _text_bundle(source, name, opts, drawn, notes)

    if hasattr(source, "first_shape"):
        channels, height, width = source.first_shape()     # from the file's header: nothing decoded yet
    else:
        first = source.read([0])
        first = first[0] if isinstance(first, list) else first[0]
        channels, height, width = (int(s) for s in first.shape)
    resize_to = (opts.image_size, opts.image_size) if opts.image_size else None
    if resize_to is None and getattr(source, "resize_to_first", False):
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
                      std=tuple(std) if std is not None else (), drawn=drawn, class_names=_names(source))


class WrongInputKind(FtdoctorError):
    """Text data for a model known to take images."""


def _names(split: Any) -> tuple[str, ...] | None:
    """The class names a split knows (string labels, a ClassLabel, an ImageFolder's folders), one per class."""
    names = getattr(split, "class_names", None)
    if names is None and hasattr(split, "source"):         # a drawn subset of a split
        names = getattr(split.source, "class_names", None)
    return tuple(str(n) for n in names) if names is not None and len(names) == split.num_classes else None


def _text_bundle(source: Any, name: str, opts: DataOptions, drawn: Drawn, notes: list[str]) -> DataBundle:
    """Texts tokenised for the model (:mod:`.text`): the tokenizer of ``--tokenizer`` or the model's folder."""
    from pathlib import Path

    from ftdoctor.data.text import encode, load_tokenizer

    if opts.model_takes_text is False:
        raise WrongInputKind(f"{name} holds texts, but the model is an image classifier",
                            "pass images for an image model (a text model is a Hugging Face "
                            "*ForSequenceClassification folder)")
    folder = opts.tokenizer or opts.model_folder
    if folder is None:
        raise FtdoctorError(f"{name} holds text, which needs a tokenizer: the model is not a folder with one",
                            "pass --tokenizer DIR (a folder with tokenizer.json or vocab.txt), or the model's "
                            "save_pretrained folder")
    dataset = encode(source, load_tokenizer(Path(folder).expanduser()), opts.max_length, opts.model_max_length,
                     notes)
    return DataBundle(dataset=dataset, name=name, split=opts.split, num_samples=len(dataset),
                      num_classes=int(source.num_classes), image_shape=(), notes=notes,
                      batch_size=opts.batch_size, workers=opts.workers, drawn=drawn, kind="text",
                      class_names=_names(source))


def _check_positive(value: Any, what: str, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise FtdoctorError(f"the {what} must be a positive integer, got {value!r}",
                            f"pass {flag} with a value of at least 1")


def _check_options(opts: DataOptions) -> None:
    _check_positive(opts.batch_size, "batch size", "--batch-size")
    if opts.max_samples is not None:
        _check_positive(opts.max_samples, "sample cap", "--max-samples")
    if opts.subset not in SUBSETS:
        raise FtdoctorError(f"unknown --subset {opts.subset!r}", f"use one of {', '.join(SUBSETS)}")
    if opts.image_size is not None:
        _check_positive(opts.image_size, "image size", "--image-size")
    if opts.in_channels is not None:
        _check_positive(opts.in_channels, "model's input channel count", "in_channels")
    if isinstance(opts.workers, bool) or not isinstance(opts.workers, (int, np.integer)) or opts.workers < 0:
        raise FtdoctorError(f"the worker count must be 0 or more, got {opts.workers!r}",
                            "pass --workers 0 to load in the main process")
    if opts.max_length is not None:
        _check_positive(opts.max_length, "token count", "--max-length")
    from ftdoctor.data.sources import source_for

    source = source_for(opts.data.strip()) if isinstance(opts.data, str) else None
    if opts.split not in SPLITS and not getattr(source, "any_split", False):
        raise FtdoctorError(f"unknown split {opts.split!r}", f"use --split {' or '.join(SPLITS)}")
    if opts.normalize not in NORMALIZATIONS:
        raise FtdoctorError(f"unknown normalization {opts.normalize!r}",
                            f"use --normalize with one of: {', '.join(NORMALIZATIONS)}")
    if not isinstance(opts.data, str) or not opts.data.strip():
        raise FtdoctorError("no data was given", f"pass --data: {names_hint()}")


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
    if mode == "inception":      # x ↦ (x − 0.5) / 0.5: [0, 1] onto [−1, 1], timm's IMAGENET_INCEPTION_MEAN/STD
        return [0.5] * channels, [0.5] * channels
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
