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


# --------------------------------------------------------------------------- input sizes

def test_recognised_architectures_bring_their_input_size():
    from ftdoctor.checkpoint.torchvision import TorchvisionSource
    import torchvision

    source = TorchvisionSource()
    with torch.device("meta"):
        vit, swin, r18 = (torchvision.models.get_model(n) for n in ("vit_b_16", "swin_t", "resnet18"))
    size = source.input_size("vit_b_16", vit)
    assert (size.exact, size.pretrained) == (224, 224) and not size.fits(32, 32) and size.fits(224, 224)
    size = source.input_size("swin_t", swin)
    assert size.exact is None and size.pretrained == 224 and not size.fits(32, 32) and size.fits(256, 256)
    assert source.input_size("resnet18", r18) is None            # a convolutional net runs at any size


TINY_VIT = '''
from torchvision.models.vision_transformer import VisionTransformer
def tiny_vit(num_classes=10):
    return VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=num_classes)
'''


def test_a_model_of_fixed_input_size_gets_its_size_and_a_mismatch_is_explained(tmp_path, monkeypatch):
    import json
    import sys

    from helpers import run_cli

    (tmp_path / "ftd_tvit.py").write_text(TINY_VIT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import ftd_tvit
    torch.manual_seed(0)
    torch.save(ftd_tvit.tiny_vit(5).state_dict(), tmp_path / "v.pt")
    sys.modules.pop("ftd_tvit", None)
    args = ["probe", "v.pt", "--arch", "ftd_tvit:tiny_vit", "--data", "shapes:5", "--max-samples", "8",
            "--probes", "noise"]
    code, out, err = run_cli(*args, "--format", "json")
    assert code == 0, err
    assert any("resized from 32×32 to 64×64" in n for n in json.loads(out)["notes"])
    code, out, err = run_cli(*args, "--image-size", "32")
    assert code == 2 and "takes 64×64 images only" in err and "--image-size 64" in err and "Wrong" not in err
