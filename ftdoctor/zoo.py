"""Small reference architectures, importable as ``--arch ftdoctor.zoo:NAME``.

``ShapesNet`` is the network ``ftdoctor demo`` pretrains on the built-in
``shapes`` data: plain convolutions, ReLU and max-pooling (no BatchNorm), so
every fix — including the function-preserving rescale — applies to it.
"""
from __future__ import annotations

from torch import Tensor, nn


class ShapesNet(nn.Module):
    """Four 3×3 convolutions and a two-layer classifier for 32×32 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
