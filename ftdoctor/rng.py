"""Per-example random numbers keyed by (seed, example index), vectorised.

The change-rate probe's random loss needs ``η_n ~ N(0, I_C)`` drawn afresh for
every example (Krähenbühl et al. §3), yet the figures must not depend on batch
size, order or sharding (SPEC §1.2). So η_n is a pure function of
(``--seed``, n, class): a counter-based generator (SplitMix64 finaliser over
the key) feeding a Box–Muller transform, computed for a whole batch at once.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _uniform(key: np.ndarray) -> np.ndarray:
    """Uniform in (0, 1) from 53 random bits of the mixed key."""
    bits = _mix(key) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def example_normals(seed: int, index: Tensor, num: int) -> Tensor:
    """Standard normals of shape (len(index), num), a function of (seed, index, column) only."""
    with np.errstate(over="ignore"):
        idx = index.detach().cpu().numpy().astype(np.uint64)[:, None]
        col = np.arange(num, dtype=np.uint64)[None, :]
        base = (_mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
                + (idx + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03)
                + (col + np.uint64(1)) * np.uint64(2) * _GOLDEN)
        u1 = _uniform(base)
        u2 = _uniform(base + _GOLDEN)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z)
