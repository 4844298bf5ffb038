"""The demo's fix steps on a small ShapesNet: the noise falls to its floor and the spread shrinks."""
from __future__ import annotations

import io
import math

import torch
from rich.console import Console

from ftdoctor.fixes.demo_steps import demo_fix_steps
from ftdoctor.outputs import journal
from ftdoctor.zoo import ShapesNet


def test_demo_fix_steps(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "source.pt"
    torch.save(ShapesNet(num_classes=10).state_dict(), src)
    text = io.StringIO()
    with journal():   # as `ftdoctor demo` runs it: one journal, later steps read what earlier ones wrote
        figs = demo_fix_steps(src, tmp_path, Console(file=text, width=120), seed=0, max_samples=64)
    assert abs(figs.noise_after - 0.25) < 1e-3 and abs(figs.cross_entropy_after - math.log(5)) < 1e-3
    assert figs.spread_after < 1.5 < figs.spread_before
    assert figs.entame_path.exists() and figs.rescale_path.exists()
    out = text.getvalue()
    assert "--method entame" in out and "--method rescale" in out and "✗" not in out
