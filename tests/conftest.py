"""Shared test fixtures: tiny models and an in-memory data bundle (no files, no downloads)."""
from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

torch.set_num_threads(min(2, os.cpu_count() or 1))


class _Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


@dataclass
class TensorBundle:
    """Duck-types ftdoctor.data.DataBundle over tensors already in memory."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    batch_size: int = 16
    name: str = "tensors"
    split: str = "train"
    notes: list = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def dataset(self) -> Dataset:
        return _Indexed(self.x, self.y)

    @property
    def image_shape(self):
        return tuple(self.x.shape[1:])

    def loader(self, batch_size=None, shuffle=False, seed=0, sampler=None, drop_last=False):
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=gen, sampler=sampler, drop_last=drop_last)


def make_bundle(shape, n=48, num_classes=5, batch_size=16, seed=0) -> TensorBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorBundle(x, y, num_classes, batch_size)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 5, in_ch: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(8 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class BNCNN(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


# An importable module's source (`--arch MODULE:SmallCNN`) for tests that drive the CLI: they write it
# into a temporary directory on sys.path under a name of their own.
NETS_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self, num_classes=10, in_ch=3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.fc = nn.Linear(8 * 4, num_classes)

        def forward(self, x):
            return self.fc(self.features(x))

    class NoAffine(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.bn(x)).flatten(1)
''')


@pytest.fixture
def nets_dir(tmp_path: Path) -> Path:
    """A working directory holding the importable test nets (``--arch ftd_hostile_nets:SmallCNN``)."""
    (tmp_path / "ftd_hostile_nets.py").write_text(NETS_SOURCE)
    sys.modules.pop("ftd_hostile_nets", None)
    return tmp_path


@pytest.fixture
def good_model(nets_dir: Path) -> Path:
    """A valid state dict of SmallCNN (10 classes) in the working directory."""
    import torch
    sys.path.insert(0, str(nets_dir))
    try:
        import ftd_hostile_nets
        torch.manual_seed(0)
        model = ftd_hostile_nets.SmallCNN(10)
    finally:
        sys.path.remove(str(nets_dir))
    path = nets_dir / "good.pt"
    torch.save(model.state_dict(), path)
    return path
