"""Smoke runs on real torchvision architectures: inspect and every probe complete, nothing silently lost."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import TensorBundle
from ftdoctor.checkpoint import ModelOptions
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.inspection import inspect
from ftdoctor.model import registered_affine_layers

VIT = ("from torchvision.models.vision_transformer import VisionTransformer\n"
       "def small_vit(num_classes=10):\n"
       "    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,\n"
       "                             mlp_dim=128, num_classes=num_classes)\n")
ARCHS = ["resnet18", "vgg11_bn", "densenet121", "mobilenet_v3_small", "convnext_tiny", "vits:small_vit"]


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_and_probe_every_architecture(arch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vits.py").write_text(VIT)
    torch.manual_seed(0)
    if ":" in arch:
        monkeypatch.syspath_prepend(str(tmp_path))
        import importlib
        model = importlib.import_module("vits").small_vit(10)
    else:
        import torchvision.models as tvm
        model = tvm.get_model(arch, weights=None, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    res = inspect(tmp_path / "m.pt", ModelOptions(arch=arch))
    assert res.model["num_classes"] == 10 and len(res.layers) >= 4 and all(l["finite"] for l in res.layers)

    model.eval()
    g = torch.Generator().manual_seed(0)
    bundle = TensorBundle(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g), 10, 3)
    run = probe_model(model, bundle, ProbeOptions(seed=0), reference=model)
    measured = {l["name"] for l in run.results["change_rate"].figures["layers"]}
    skipped = {s.name for s in run.skipped}
    every = {l.name for l in registered_affine_layers(model)}
    assert every <= measured | skipped                       # each affine layer measured or listed with a reason
    assert math.isfinite(run.results["noise"].figures["cross_entropy"])
    assert all(abs(r["median"] - 1) < 1e-6 for r in run.results["r2"].figures["layers"] if r["median"] is not None)
    if arch.startswith("vits"):
        assert any(s.name.endswith("in_proj_weight") for s in run.skipped)
        assert any(s.name.endswith("out_proj") for s in run.skipped)
