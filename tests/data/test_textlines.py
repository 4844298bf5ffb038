"""The ``textlines`` data: PP-OCR's 3×48×192 layout, pure in (seed, split, index), the four flips exact."""
from __future__ import annotations

import pytest
import torch

from ftdoctor.data import DataOptions, load_data
from ftdoctor.data.textlines import render_line
from ftdoctor.errors import FtdoctorError


def test_layout_classes_and_determinism():
    bundle = load_data(DataOptions("textlines", max_samples=40, normalize="none", batch_size=16))
    assert bundle.num_classes == 4 and bundle.class_names == ("upright", "rotated-180", "mirrored", "flipped")
    x, y, idx = next(iter(bundle.loader()))
    assert x.shape == (16, 3, 48, 192) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = load_data(DataOptions("textlines", max_samples=40, normalize="none", batch_size=5))
    x2, _, idx2 = next(iter(again.loader()))
    assert torch.equal(idx[:5], idx2) and torch.equal(x[:5], x2)      # the same images in any batch
    assert set(bundle.labels.tolist()) == {0, 1, 2, 3}


def test_each_class_is_the_upright_line_flipped():
    up = torch.from_numpy(render_line(0, "train", 7, 0, 4))
    assert torch.equal(torch.from_numpy(render_line(0, "train", 7, 1, 4)), up.flip(1, 2))
    assert torch.equal(torch.from_numpy(render_line(0, "train", 7, 2, 4)), up.flip(2))
    assert torch.equal(torch.from_numpy(render_line(0, "train", 7, 3, 4)), up.flip(1))
    assert not torch.equal(up, torch.from_numpy(render_line(0, "test", 7, 0, 4)))   # splits differ


def test_two_class_task_and_inception_normalisation():
    raw = load_data(DataOptions("textlines:2", max_samples=8, normalize="none"))
    norm = load_data(DataOptions("textlines:2", max_samples=8, normalize="inception"))
    assert raw.num_classes == 2
    a, b = next(iter(raw.loader()))[0], next(iter(norm.loader()))[0]
    assert torch.allclose(b, (a - 0.5) / 0.5)


def test_bad_names_are_one_line_errors():
    with pytest.raises(FtdoctorError, match="textlines has the 2-class task"):
        load_data(DataOptions("textlines:3"))
    with pytest.raises(FtdoctorError, match="split"):
        load_data(DataOptions("textlines", split="validation"))
