"""``shapes``: the built-in procedural image set — deterministic, learnable, no files.

Every image is a 32×32 RGB picture of one coloured shape on a noisy
background. Each image draws, from its own random stream: the shape's kind,
a fill pattern (one of the 9 :data:`PATTERNS`, drawn in screen coordinates),
colour (hue, saturation, brightness; the pattern's second colour is the same
hue at 45 % brightness), position, scale (radius 7.5–11.5 px), rotation, the
pattern's period and phase, background colour and the amplitude of the
background noise. Only the kind is the label; everything else is nuisance.

What ``C`` in ``shapes:C`` means:

* ``shapes`` = ``shapes:10`` — the **source task**: which of the 10
  :data:`SHAPE_KINDS` (circle, square, triangle, plus, ring, star, bar,
  frame, half-disc, ell), upright up to a rotation jitter of ±25°.
* ``shapes:C`` for 2 ≤ C ≤ 9 — a **target task**: which of the first ``C``
  :data:`NOVEL_KINDS` (rhombus, tripod, hexagon, chevron, crescent, tee,
  hourglass, two-dots, arch), kinds the source task never shows, at any
  rotation; so ``shapes:5`` tells rhombus, tripod, hexagon, chevron and
  crescent apart. Patterns, colours and backgrounds are drawn as in the
  source task.

The pair is the fine-tuning-transfer setting ftdoctor's demo runs on: a
network trained on ``shapes:10`` has learned edges, corners, curvature and
where the shape is, which is useful for ``shapes:5``, but not sufficient —
the classes are new and their pose is free, so the deeper layers must change.
Measured with a 4-conv, 16–64-channel BN network trained 6 epochs on
``shapes:10`` (97.7 % test accuracy): a linear probe on its frozen features
reaches 76 % on ``shapes:5`` (22 % on random features); fine-tuning it with
Adam at lr 1e-4 for 64 steps reaches 55 %, the same network from scratch 32 %.

Randomness is counter-based (a SplitMix64 finaliser over a key made of
``seed``, split, ``C`` and the image index), so an image is a pure function of
``(seed, split, C, index)``: the same whatever batch it is rendered in,
bit-identical across runs, and the train and test splits come from disjoint
streams. Rendering is vectorised over a whole batch of indices (numpy, one
Python loop over the kinds and one over the patterns, none over pixels or
examples): about 0.1 s for 1024 images on one core.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ftdoctor.errors import FtdoctorError

SHAPE_KINDS: tuple[str, ...] = (
    "circle", "square", "triangle", "plus", "ring",
    "star", "bar", "frame", "half-disc", "ell",
)
NOVEL_KINDS: tuple[str, ...] = (
    "rhombus", "tripod", "hexagon", "chevron", "crescent",
    "tee", "hourglass", "two-dots", "arch",
)
_ALL_KINDS = SHAPE_KINDS + NOVEL_KINDS
PATTERNS: tuple[str, ...] = (
    "solid", "horizontal-stripes", "vertical-stripes", "checkerboard", "dots",
    "diagonal-up", "diagonal-down", "grid", "outline",
)
IMAGE_SIZE = 32
SPLIT_SIZES: dict[str, int] = {"train": 4096, "test": 1024}
DEFAULT_CLASSES = len(SHAPE_KINDS)
MIN_CLASSES = 2
MAX_CLASSES = DEFAULT_CLASSES

_SPLIT_TAGS = {"train": 0x51A7E5, "test": 0x7E57AB}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM = np.uint64(0xD1B54A32D192ED03)

# Columns of the per-image parameter draws.
(_U_LABEL, _U_PATTERN, _U_CX, _U_CY, _U_SCALE, _U_ANGLE, _U_HUE, _U_SAT, _U_VAL,
 _U_PERIOD, _U_PHASE_X, _U_PHASE_Y, _U_BG_R, _U_BG_G, _U_BG_B, _U_NOISE) = range(16)
_NUM_DRAWS = 16
_SOURCE_ROTATION = np.deg2rad(25.0)  # the source task's jitter; target tasks turn freely


def is_source_task(num_classes: int = DEFAULT_CLASSES) -> bool:
    """True for ``shapes:10`` (the 10 source kinds), False for ``shapes:2`` … ``shapes:9``."""
    check_num_classes(num_classes)
    return num_classes == DEFAULT_CLASSES


def class_names(num_classes: int = DEFAULT_CLASSES) -> tuple[str, ...]:
    """The names of the classes of ``shapes:C``, in label order."""
    return SHAPE_KINDS if is_source_task(num_classes) else NOVEL_KINDS[:num_classes]


def check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or not (
            MIN_CLASSES <= num_classes <= MAX_CLASSES):
        raise FtdoctorError(
            f"shapes:{num_classes} is not a shapes task: C must be between "
            f"{MIN_CLASSES} and {MAX_CLASSES}",
            "use 'shapes' (= shapes:10, the 10 source kinds) or shapes:2 … shapes:9 "
            "(that many novel kinds, the transfer targets)")


def _check_split(split: str) -> None:
    if split not in SPLIT_SIZES:
        raise FtdoctorError(f"shapes has no split {split!r}",
                            f"use --split with one of: {', '.join(SPLIT_SIZES)}")


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _keys(indices: np.ndarray, num_classes: int, seed: int, split: str) -> np.ndarray:
    """One 64-bit key per image: a function of (seed, split, C, index) only."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        base = _mix(base ^ np.uint64(_SPLIT_TAGS[split]) ^ (np.uint64(num_classes) << np.uint64(40)))
        return _mix(base + (indices.astype(np.uint64) + np.uint64(1)) * _STREAM)


def _uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) per key, shape (len(keys), count), float64."""
    with np.errstate(over="ignore"):
        cols = (np.arange(count, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        bits = _mix(keys[:, None] + cols[None, :]) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / float(1 << 53))


def _noise(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` float32 uniforms in [0, 1) per key, 16 bits each (four per hash)."""
    words = (count + 3) // 4
    with np.errstate(over="ignore"):
        cols = (np.arange(words, dtype=np.uint64) + np.uint64(_NUM_DRAWS + 1)) * _GOLDEN
        bits = _mix(keys[:, None] + cols[None, :])
    shifts = np.arange(0, 64, 16, dtype=np.uint64)
    chunks = ((bits[:, :, None] >> shifts) & np.uint64(0xFFFF)).reshape(len(keys), 4 * words)
    return chunks[:, :count].astype(np.float32) * np.float32(1.0 / 65536.0)


def _as_indices(indices: Sequence[int] | np.ndarray | Tensor, size: int) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(-1)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= size):
        raise IndexError(f"shapes indices must be integers in [0, {size})")
    return idx.astype(np.int64)


def _draw_label_and_pattern(u: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, kind, pattern) per image; kind indexes SHAPE_KINDS + NOVEL_KINDS."""
    label = np.minimum((u[:, _U_LABEL] * num_classes).astype(np.int64), num_classes - 1)
    kind = label if num_classes == DEFAULT_CLASSES else label + len(SHAPE_KINDS)
    pattern = np.minimum((u[:, _U_PATTERN] * len(PATTERNS)).astype(np.int64), len(PATTERNS) - 1)
    return label, kind, pattern


def labels(indices: Sequence[int] | np.ndarray | Tensor, *, num_classes: int = DEFAULT_CLASSES,
           seed: int = 0, split: str = "train") -> Tensor:
    """The labels of the given images without rendering them (int64)."""
    check_num_classes(num_classes)
    _check_split(split)
    idx = _as_indices(indices, SPLIT_SIZES[split])
    u = _uniforms(_keys(idx, num_classes, seed, split), 2)
    return torch.from_numpy(_draw_label_and_pattern(u, num_classes)[0])


# Approximate signed distances (negative inside) in units of the shape's radius,
# for local coordinates (x, y), y pointing down as in the image.
def _box(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.maximum(np.abs(x) - a, np.abs(y) - b)


def _sdf(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    name = _ALL_KINDS[kind]
    if name == "circle":
        return np.hypot(x, y) - 0.95
    if name == "square":
        return _box(x, y, 0.78, 0.78)
    if name == "triangle":  # equilateral, apex up; centroid at the origin
        edges = [float(np.cos(a)) * x + float(np.sin(a)) * y
                 for a in np.deg2rad([90.0, 210.0, 330.0])]
        return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - 0.55
    if name == "plus":
        return np.minimum(_box(x, y, 0.95, 0.3), _box(x, y, 0.3, 0.95))
    if name == "ring":
        return np.abs(np.hypot(x, y) - 0.72) - 0.24
    if name == "star":
        radius = np.hypot(x, y)
        angle = np.arctan2(y, x) + np.pi / 2
        return (radius - (0.62 + 0.38 * np.cos(5.0 * angle))) * 0.6
    if name == "bar":
        return _box(x, y, 0.98, 0.34)
    if name == "frame":
        return np.abs(np.maximum(np.abs(x), np.abs(y)) - 0.62) - 0.2
    if name == "half-disc":  # the top half of a disc centred a little below the origin
        yc = y - 0.35
        return np.maximum(np.hypot(x, yc) - 1.0, yc)
    if name == "ell":
        return np.minimum(_box(x + 0.5, y, 0.3, 0.9), _box(x, y - 0.6, 0.8, 0.3))
    if name == "rhombus":  # a diamond twice as tall as wide
        return (np.abs(x) / 0.55 + np.abs(y) - 1.0) * 0.48
    if name == "tripod":  # three arms 120° apart, like a Y
        arms = [_box(float(np.cos(a)) * x + float(np.sin(a)) * y - 0.45,
                     -float(np.sin(a)) * x + float(np.cos(a)) * y, 0.5, 0.24)
                for a in np.deg2rad([90.0, 210.0, 330.0])]
        return np.minimum(np.minimum(arms[0], arms[1]), arms[2])
    if name == "hexagon":
        return np.maximum(np.abs(x) * 0.866 + np.abs(y) * 0.5, np.abs(y)) - 0.82
    if name == "chevron":  # a V pointing down
        c, s_ = 0.8, 0.6
        left = _box(c * (x + 0.4) + s_ * (y + 0.1), -s_ * (x + 0.4) + c * (y + 0.1), 0.6, 0.22)
        right = _box(c * (x - 0.4) - s_ * (y + 0.1), s_ * (x - 0.4) + c * (y + 0.1), 0.6, 0.22)
        return np.minimum(left, right)
    if name == "crescent":
        return np.maximum(np.hypot(x, y) - 0.95, 0.75 - np.hypot(x - 0.45, y + 0.15))
    if name == "tee":
        return np.minimum(_box(x, y + 0.6, 0.9, 0.28), _box(x, y - 0.1, 0.28, 0.85))
    if name == "hourglass":
        return np.maximum(np.abs(x) - 0.85 * np.abs(y), np.abs(y) - 0.9) * 0.7
    if name == "two-dots":
        return np.minimum(np.hypot(x + 0.5, y), np.hypot(x - 0.5, y)) - 0.42
    if name == "arch":  # the top half of a ring
        return np.maximum(np.abs(np.hypot(x, y - 0.35) - 0.75) - 0.24, y - 0.35)
    raise AssertionError(name)


def _square_wave(t: np.ndarray, sharpness: float = 2.0) -> np.ndarray:
    """A soft 0/1 square wave of period 1 in ``t``."""
    return np.clip(0.5 + sharpness * np.cos((2.0 * np.pi) * t), 0.0, 1.0).astype(t.dtype, copy=False)


def _pattern(pattern: int, tx: np.ndarray, ty: np.ndarray, signed_px: np.ndarray) -> np.ndarray:
    """Fill mask in [0, 1]: 1 = the shape's colour, 0 = its darker second colour.

    ``tx`` (n, 1, S) and ``ty`` (n, S, 1) are screen coordinates in periods of
    the pattern, phase included; ``signed_px`` (n, S, S) the signed distance
    to the shape's edge in pixels.
    """
    name = PATTERNS[pattern]
    shape = signed_px.shape
    if name == "solid":
        return np.ones(shape, dtype=signed_px.dtype)
    if name == "horizontal-stripes":
        return np.broadcast_to(_square_wave(ty), shape)
    if name == "vertical-stripes":
        return np.broadcast_to(_square_wave(tx), shape)
    if name == "checkerboard":
        a, b = _square_wave(tx * 0.5), _square_wave(ty * 0.5)
        return a * b + (1 - a) * (1 - b)
    if name == "dots":
        cx = 0.5 + 0.5 * np.cos(2 * np.pi * tx)
        cy = 0.5 + 0.5 * np.cos(2 * np.pi * ty)
        return np.clip((cx * cy - 0.45) * 4.0, 0.0, 1.0)
    if name == "diagonal-up":
        return _square_wave((tx + ty) / np.sqrt(2.0))
    if name == "diagonal-down":
        return _square_wave((tx - ty) / np.sqrt(2.0))
    if name == "grid":
        lx = np.clip((np.cos(2 * np.pi * tx) - 0.6) * 3.0, 0.0, 1.0)
        ly = np.clip((np.cos(2 * np.pi * ty) - 0.6) * 3.0, 0.0, 1.0)
        return np.maximum(lx, ly)
    if name == "outline":  # a band about 1.5 px wide along the edge
        return np.clip(2.5 + signed_px, 0.0, 1.0)
    raise AssertionError(name)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) arrays in [0, 1] -> (N, 3) RGB."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def render(indices: Sequence[int] | np.ndarray | Tensor, *, num_classes: int = DEFAULT_CLASSES,
           seed: int = 0, split: str = "train") -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Image ``i`` is a pure function of ``(seed, split, num_classes, i)``.
    """
    check_num_classes(num_classes)
    _check_split(split)
    idx = _as_indices(indices, SPLIT_SIZES[split])
    n = idx.size
    keys = _keys(idx, num_classes, seed, split)
    u = _uniforms(keys, _NUM_DRAWS)
    label, kind, pattern = _draw_label_and_pattern(u, num_classes)

    size = IMAGE_SIZE
    f32 = np.float32
    coords = np.arange(size, dtype=f32) + f32(0.5)
    radius = 7.5 + 4.0 * u[:, _U_SCALE]
    margin = 0.75 * radius
    cx = margin + (size - 2 * margin) * u[:, _U_CX]
    cy = margin + (size - 2 * margin) * u[:, _U_CY]
    angle = (2.0 * u[:, _U_ANGLE] - 1.0) * (_SOURCE_ROTATION if num_classes == DEFAULT_CLASSES else np.pi)
    period = 3.6 + 1.6 * u[:, _U_PERIOD]

    def column(v: np.ndarray, sel: np.ndarray) -> np.ndarray:  # (n_sel, 1, 1) float32
        return v[sel].astype(f32)[:, None, None]

    xs, ys = coords[None, None, :], coords[None, :, None]
    signed_px = np.empty((n, size, size), dtype=f32)
    for k in np.unique(kind):
        sel = kind == k
        r = column(radius, sel)
        dx, dy = (xs - column(cx, sel)) / r, (ys - column(cy, sel)) / r
        cos, sin = np.cos(column(angle, sel)), np.sin(column(angle, sel))
        signed_px[sel] = _sdf(int(k), cos * dx + sin * dy, cos * dy - sin * dx) * r
    alpha = np.clip(f32(0.5) - signed_px, 0.0, 1.0)

    fill = np.empty((n, size, size), dtype=f32)
    for p in np.unique(pattern):
        sel = pattern == p
        t = column(period, sel)
        tx = xs / t + column(u[:, _U_PHASE_X], sel)
        ty = ys / t + column(u[:, _U_PHASE_Y], sel)
        fill[sel] = _pattern(int(p), tx, ty, signed_px[sel])

    colour = _hsv_to_rgb(u[:, _U_HUE], 0.55 + 0.45 * u[:, _U_SAT], 0.75 + 0.25 * u[:, _U_VAL])
    shade = 0.45 * colour
    background = 0.25 * u[:, [_U_BG_R, _U_BG_G, _U_BG_B]]
    noise_amplitude = 0.03 + 0.09 * u[:, _U_NOISE]
    noise = _noise(keys, 3 * size * size).reshape(n, 3, size, size)
    noise = (2.0 * noise - 1.0) * noise_amplitude.astype(f32)[:, None, None, None]

    fill, alpha = fill[:, None], alpha[:, None]
    colour, shade = colour.astype(f32)[:, :, None, None], shade.astype(f32)[:, :, None, None]
    foreground = shade + fill * (colour - shade)
    image = background.astype(f32)[:, :, None, None]
    image = image + alpha * (foreground - image) + noise
    image = np.clip(image, 0.0, 1.0, out=image)
    return torch.from_numpy(image), torch.from_numpy(label)


class ShapesDataset(Dataset):
    """``shapes:C``, one split: item ``i`` -> (image 3×32×32 float32 in [0, 1], label).

    Images are rendered on demand (``__getitems__`` renders a whole batch at
    once, which is what a DataLoader calls); nothing is stored.
    """

    def __init__(self, num_classes: int = DEFAULT_CLASSES, split: str = "train", seed: int = 0,
                 size: int | None = None) -> None:
        check_num_classes(num_classes)
        _check_split(split)
        self.num_classes = int(num_classes)
        self.split = split
        self.seed = int(seed)
        full = SPLIT_SIZES[split]
        self.size = full if size is None else max(0, min(int(size), full))

    def __len__(self) -> int:
        return self.size

    def _check(self, indices: Sequence[int]) -> list[int]:
        out = [int(i) + self.size if int(i) < 0 else int(i) for i in indices]
        if any(i < 0 or i >= self.size for i in out):
            raise IndexError(f"index out of range for a shapes split of {self.size} images")
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        (i,) = self._check([index])
        x, y = self.render([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        x, y = self.render(self._check(indices))
        return [(x[j], int(y[j])) for j in range(len(y))]

    def render(self, indices: Sequence[int] | np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, 3, 32, 32) and labels (N,) of the given indices, in one vectorised pass."""
        return render(indices, num_classes=self.num_classes, seed=self.seed, split=self.split)

    @property
    def targets(self) -> Tensor:
        """All labels of the split (int64), computed without rendering."""
        return labels(np.arange(self.size), num_classes=self.num_classes, seed=self.seed,
                      split=self.split)
