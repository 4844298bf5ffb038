"""``textlines`` / ``textlines:2``: lines of text rendered with the machine's own fonts, 3×48×192 in [0, 1].

The layout of PP-OCR's text-line classifiers (and of most text-line recognisers): one line of dark text on
a light background, 48 pixels high and 192 wide. Two tasks:

* ``textlines:2`` — PP-OCR's own task: upright (0) or rotated by 180° (1), which its direction classifier
  was trained for (a check that the data is in its domain);
* ``textlines`` (four classes) — a task a user of such a model would plausibly fine-tune it for, telling
  scans and photographs apart by how they were flipped: upright (0), rotated 180° (1), mirrored left–right
  (2, text seen through the page or a selfie camera), mirrored top–bottom (3). Classes 2 and 3 hold the
  same glyph shapes as 0 and 1 in reverse order, so the pretrained features see the difference only in
  the glyphs' orientation.

Image ``i`` of a split is a pure function of ``(seed, split, i)`` (its own ``random.Random``): the text
(4–14 letters and digits, or a word-like mix), the font (a TrueType font the machine has, from the
usual font folders; Pillow's built-in one where there is none), its size, the grey levels and a slight
colour tint, the position. The same machine gives the same images in any batch and run; another
machine's fonts give another (equally valid) sample. Rendering takes about 1.5 ms per image.
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ftdoctor.data.arrays import capped
from ftdoctor.data.builtin import derive_seed
from ftdoctor.data.sources import DataSource, register_data_source
from ftdoctor.errors import FtdoctorError

HEIGHT, WIDTH = 48, 192
SPLIT_SIZES = {"train": 2048, "test": 512}
TASKS = {2: ("upright", "rotated-180"), 4: ("upright", "rotated-180", "mirrored", "flipped")}
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/System/Library/Fonts", "/Library/Fonts", "C:/Windows/Fonts")
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_SYLLABLES = ("ka", "re", "mon", "ti", "la", "ver", "sto", "nu", "pe", "gra", "fil", "do", "ben", "ship", "ion",
              "tex", "au", "qui", "zor", "ly", "ment", "ing", "ed", "th", "ch", "str", "pl", "or", "an", "es")
_SPLIT_TAGS = {"train": 0x7E47, "test": 0x7E57}


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """The TrueType/OpenType fonts in the usual font folders, sorted (empty: Pillow's built-in font)."""
    found = []
    for folder in FONT_DIRS:
        root = Path(os.path.expanduser(folder))
        if root.is_dir():
            found += [str(p) for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf") and p.is_file()]
    return tuple(sorted(set(found)))


@functools.lru_cache(maxsize=256)
def _font(path: str | None, size: int) -> Any:
    from PIL import ImageFont

    if path is None:
        return ImageFont.load_default(size)
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


def _text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(4, 14)))
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    line = " ".join(words)
    return line.capitalize() if rng.random() < 0.5 else line


def render_line(seed: int, split: str, index: int, label: int, num_classes: int) -> np.ndarray:
    """Image ``index``: (3, 48, 192) float32 in [0, 1], transformed as class ``label`` says."""
    from PIL import Image, ImageDraw

    rng = random.Random(derive_seed(seed, _SPLIT_TAGS[split], index, num_classes))
    fonts = font_files()
    path = fonts[rng.randrange(len(fonts))] if fonts else None
    text = _text(rng)
    size = rng.randint(24, 38)
    font = _font(path, size)
    left, top, right, bottom = font.getbbox(text)
    while (right - left > WIDTH - 8 or bottom - top > HEIGHT - 4) and size > 10:
        size -= 2
        font = _font(path, size)
        left, top, right, bottom = font.getbbox(text)
    background, ink = rng.randint(175, 255), rng.randint(0, 80)
    image = Image.new("L", (WIDTH, HEIGHT), background)
    x = rng.randint(2, max(2, WIDTH - (right - left) - 2)) - left
    y = (HEIGHT - (bottom - top)) // 2 - top + rng.randint(-2, 2)
    ImageDraw.Draw(image).text((x, y), text, fill=ink, font=font)
    grey = np.asarray(image, dtype=np.float32) / 255.0
    tint = np.array([rng.uniform(0.9, 1.0) for _ in range(3)], dtype=np.float32)[:, None, None]
    rgb = grey[None] * tint + (1 - tint) * 0.5 * grey[None]
    if label == 1:
        rgb = rgb[:, ::-1, ::-1]
    elif label == 2:
        rgb = rgb[:, :, ::-1]
    elif label == 3:
        rgb = rgb[:, ::-1, :]
    return np.ascontiguousarray(rgb, dtype=np.float32)


class TextLinesSplit:
    def __init__(self, num_classes: int, split: str, seed: int, size: int) -> None:
        if split not in SPLIT_SIZES:
            raise FtdoctorError(f"textlines has no split {split!r}", f"use --split with one of: {', '.join(SPLIT_SIZES)}")
        self.num_classes, self.split, self.seed = num_classes, split, seed
        self.class_names = TASKS[num_classes]
        generator = torch.Generator().manual_seed(derive_seed(seed, _SPLIT_TAGS[split], -1, num_classes))
        self.labels = torch.randint(0, num_classes, (SPLIT_SIZES[split],), generator=generator)[:size]

    def read(self, indices: Sequence[int]) -> Tensor:
        return torch.from_numpy(np.stack([render_line(self.seed, self.split, int(i), int(self.labels[int(i)]),
                                                      self.num_classes) for i in indices]))


def parse_classes(data: str) -> int:
    _, _, count = data.partition(":")
    if not count:
        return 4
    if count.strip() not in ("2", "4"):
        raise FtdoctorError(f"{data!r}: textlines has the 2-class task (upright / 180°) and the 4-class one",
                            "use textlines (four classes) or textlines:2")
    return int(count)


@register_data_source(name="textlines", priority=15, names=("textlines", "textlines:2"))
class TextLinesData(DataSource):
    def claims(self, data: str) -> bool:
        key = data.lower()
        return key == "textlines" or key.startswith("textlines:")

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        num_classes = parse_classes(data)
        size = capped(SPLIT_SIZES.get(opts.split, 0), opts.max_samples)
        return TextLinesSplit(num_classes, opts.split, opts.seed, size), data

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        return []
