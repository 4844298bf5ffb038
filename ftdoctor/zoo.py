"""Small reference architectures, importable as ``--arch ftdoctor.zoo:NAME``.

``ShapesNet`` is the network ``ftdoctor demo`` pretrains on the built-in
``shapes`` data: four 3×3 convolutions, each followed by BatchNorm, ReLU and
max-pooling, then a two-layer classifier. Every fix applies to it; ``rescale``
undoes each convolution's scale in the BatchNorm that follows it and the first
Linear layer's scale in the head.
"""
from __future__ import annotations

from torch import Tensor, nn


class ShapesNet(nn.Module):
    """Four conv–BN–ReLU–pool stages and a two-layer classifier for 32×32 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        chans = [in_channels, w, 2 * w, 4 * w, 4 * w]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(4 * w * 4, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
