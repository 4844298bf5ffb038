"""The built-in data, no files: ``shapes`` / ``shapes:C`` (procedural, learnable) and ``fake`` (noise)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ftdoctor import shapes
from ftdoctor.data.arrays import capped
from ftdoctor.data.sources import DataSource, register_data_source
from ftdoctor.errors import FtdoctorError

FAKE_SIZES = {"train": 1024, "test": 256}
FAKE_CLASSES = 10
FAKE_IMAGE_SIZE = 32
SPLITS = ("train", "test")


class ShapesSplit:
    def __init__(self, num_classes: int, split: str, seed: int, size: int | None) -> None:
        self.shapes = shapes.ShapesDataset(num_classes, split, seed, size)
        self.num_classes = num_classes
        self.labels = self.shapes.targets

    def read(self, indices: Sequence[int]) -> Tensor:
        return self.shapes.render(indices)[0]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 over their sequence)."""
    z = 0x9E3779B97F4A7C15
    for part in parts:
        z = (z + (part & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


class FakeSplit:
    """Uniform noise images; image ``i`` is seeded by (seed, split, i), labels by (seed, split)."""

    def __init__(self, split: str, seed: int, size: int, count: int) -> None:
        self.split_tag = SPLITS.index(split) + 1
        self.seed = seed
        self.size = size
        self.num_classes = FAKE_CLASSES
        generator = torch.Generator().manual_seed(derive_seed(seed, self.split_tag, -1))
        self.labels = torch.randint(0, FAKE_CLASSES, (FAKE_SIZES[split],), generator=generator)[:count]

    def read(self, indices: Sequence[int]) -> Tensor:
        out = torch.empty(len(indices), 3, self.size, self.size)
        generator = torch.Generator()
        for row, i in enumerate(indices):
            generator.manual_seed(derive_seed(self.seed, self.split_tag, int(i)))
            torch.rand(3, self.size, self.size, generator=generator, out=out[row])
        return out


def parse_shapes_classes(data: str) -> int:
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


@register_data_source(name="shapes", priority=10, names=("shapes", "shapes:C (C = 2 … 10)"))
class ShapesData(DataSource):
    def claims(self, data: str) -> bool:
        key = data.lower()
        return key == "shapes" or key.startswith("shapes:")

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        num_classes = parse_shapes_classes(data)
        return ShapesSplit(num_classes, opts.split, opts.seed, capped(shapes.SPLIT_SIZES[opts.split],
                                                                   opts.max_samples)), data

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        return []


@register_data_source(name="fake", priority=20, names=("fake",))
class FakeData(DataSource):
    def claims(self, data: str) -> bool:
        return data.lower() == "fake"

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        size = opts.image_size or FAKE_IMAGE_SIZE
        return FakeSplit(opts.split, opts.seed, size, capped(FAKE_SIZES[opts.split], opts.max_samples)), data

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        return []
