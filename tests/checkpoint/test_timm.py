"""timm models by ``--arch timm:NAME``: built offline, probed, fixed and reloaded in timm."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import layer_squares_vs_loop, run_cli

timm = pytest.importorskip("timm")

SMALL = {  # tiny variants of three families, random weights (nothing is downloaded)
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "efficientnet_b0": {},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    out = {}
    for name, kw in SMALL.items():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        path = root / f"{name}.pt"
        torch.save(model.state_dict(), path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_probe_fix_check_and_reload_in_timm(checkpoints, name, tmp_path):
    path, arch = checkpoints[name], ["--arch", f"timm:{name}"]
    data = ["--data", "shapes:5", "--max-samples", "16", "--batch-size", "8"]
    code, out, err = run_cli("probe", str(path), *arch, *data, "--new-head", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    measured = {l["name"] for l in report["probes"]["change_rate"]["layers"]}
    if name.startswith("vit"):
        assert "blocks.0.attn.qkv" in measured and "blocks.1.mlp.fc2" in measured   # timm's qkv Linear
    fixed = tmp_path / "fixed.pt"
    code, out, err = run_cli("fix", str(path), *arch, *data, "--method", "entame", "--new-head", "-o", str(fixed))
    assert code == 0, err
    code, out, err = run_cli("check", str(fixed), *arch, *data, "--format", "json")
    assert code in (0, 1), err
    verdict = {c["name"]: c for c in json.loads(out)["checkpoints"][0]["checks"]}
    assert verdict["max_noise_fraction"]["passed"] and verdict["max_excess_noise_fraction"]["passed"]
    model = timm.create_model(name, pretrained=False, num_classes=5, **SMALL[name])   # timm's own loader
    model.load_state_dict(torch.load(fixed, weights_only=True), strict=True)


def test_a_vit_gets_its_image_size_from_the_position_embedding(checkpoints):
    code, out, err = run_cli("probe", str(checkpoints["vit_tiny_patch16_224"]), "--arch", "timm:vit_tiny_patch16_224",
                             "--data", "shapes", "--max-samples", "8", "--probes", "noise", "--format", "json")
    assert code == 0, err
    notes = " ".join(json.loads(out)["notes"])
    assert "img_size=64" in notes and "resized from 32×32 to 64×64" in notes


def test_an_unknown_timm_name_says_what_is_close(checkpoints):
    code, out, err = run_cli("inspect", str(checkpoints["convnext_atto"]), "--arch", "timm:convnext_atoo")
    assert code == 2 and "timm has no model 'convnext_atoo'" in err and "timm:convnext_atto" in err


def test_per_example_squares_of_a_timm_vit_equal_a_per_example_loop():
    """Every affine layer of a timm ViT (patch embedding, qkv, projections, MLP, head) in float64."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    pairs = layer_squares_vs_loop(model.double().eval(), torch.randn(3, 3, 32, 32, dtype=torch.float64))
    assert "blocks.0.attn.qkv" in pairs
    for name, (got, want) in pairs.items():
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5, name


def test_a_bare_timm_state_dict_is_recognised_without_arch(tmp_path, monkeypatch):
    """torchvision first; then timm's families whose pretrained config names the file's first convolution and
    classifier; the signatures built on meta are cached, and the second recognition reads them."""
    monkeypatch.setenv("FTDOCTOR_CACHE", str(tmp_path / "cache"))
    from ftdoctor.checkpoint import load_model

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=7)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert (loaded.arch, loaded.source, loaded.num_classes) == ("timm:convnext_atto", "timm", 7)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model.eval()(x))
    assert list((tmp_path / "cache").glob("timm-*-signatures.json"))
    again = load_model(tmp_path / "c.pt")          # from the cache
    assert again.arch == "timm:convnext_atto"


def test_a_timm_state_dict_that_fits_several_models_names_them(tmp_path):
    from ftdoctor.checkpoint import load_model
    from ftdoctor.errors import FtdoctorError

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).state_dict(),
               tmp_path / "v.pt")
    with pytest.raises(FtdoctorError, match="several timm models: .*timm:vit_tiny_patch16_224") as info:
        load_model(tmp_path / "v.pt")
    assert "--arch" in info.value.remedy
