"""Shared helpers of the fix tests: tiny user models in an importable module, data files, figures by hand.

The models live in a module written to a temporary directory that is put on
``sys.path`` and made the working directory, so ``--arch ftd_fixnets:NAME``
resolves as it would for a user, and full pickled modules can be loaded back.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NETS = '''
import torch
from torch import nn


class PlainCNN(nn.Module):
    """Conv/ReLU/MaxPool/Linear, no BatchNorm, six convolutions (VGG-like)."""

    def __init__(self, num_classes=5, in_ch=3):
        super().__init__()
        chans = [in_ch, 8, 8, 16, 16, 16, 16]
        layers = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BNNet(nn.Module):
    def __init__(self, num_classes=5, in_ch=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class Small(nn.Module):
    def __init__(self, num_classes=5, in_ch=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
'''

IMAGE = (3, 8, 8)


def make_data(path: Path, n: int = 64, num_classes: int = 5, shape=IMAGE, seed: int = 0,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An .npz data set (``x``, ``y``) of random images; returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * scale
    y = torch.arange(n) % num_classes     # every class present
    np.savez(path, x=x.numpy(), y=y.numpy())
    return x, y


def data_options(path: Path, n: int = 64, batch_size: int = 16):
    from ftdoctor.data import DataOptions
    return DataOptions(data=str(path), normalize="none", max_samples=n, batch_size=batch_size, seed=0)


def data_flags(path: Path, n: int = 64, batch_size: int = 16) -> list[str]:
    return ["--data", str(path), "--normalize", "none", "--max-samples", str(n), "--batch-size", str(batch_size)]


def head_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, noise fraction ζ/φ) computed by hand (ENTAME eq. 12)."""
    logits = logits.double()
    p = logits.softmax(1)
    onehot = F.one_hot(y, logits.shape[1]).double()
    zeta = float((p * p).sum(1).mean())
    kappa = float((p * onehot).sum(1).mean())
    return float(F.cross_entropy(logits, y)), zeta / (zeta + 1 - 2 * kappa)


def brute_force_rates(model: nn.Module, x: torch.Tensor, names: list[str], seed: int = 0) -> dict[str, float]:
    """change_rate per layer (SPEC §1.2) by a loop over single examples with autograd."""
    from ftdoctor.rng import example_normals
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    g2 = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    model.eval()
    for i in range(len(x)):
        out = model(x[i:i + 1])
        eta = example_normals(seed, torch.tensor([i]), out.shape[1]).to(out.dtype)
        grads = torch.autograd.grad((eta * out).sum(), weights)
        for acc, g in zip(g2, grads):
            acc += g.double() ** 2
    return {n: math.sqrt(float(acc.mean()) / len(x) / float((w.detach().double() ** 2).mean()))
            for n, acc, w in zip(names, g2, weights)}


def misscale_(model: nn.Module, factors=(8.0, 0.1, 6.0, 0.2, 5.0)) -> nn.Module:
    """Function-preserving mis-scaling across ReLU/MaxPool: conv k × s (weight and bias), conv k+1 ÷ s."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for k, s in enumerate(factors):
            convs[k].weight *= s
            convs[k].bias *= s
            convs[k + 1].weight /= s
    return model


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())
