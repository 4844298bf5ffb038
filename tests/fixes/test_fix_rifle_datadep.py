"""``rifle`` (head re-drawn, nothing else moved) and ``datadep`` (Krähenbühl Alg. 1: mean β, std 1)."""
from __future__ import annotations

import math

import pytest
import torch

from fixhelp import data_options, make_data
from ftdoctor.checkpoint import ModelOptions
from ftdoctor.errors import FtdoctorError
from ftdoctor.fixes import DatadepOptions, RifleOptions, fix

ARCH = ModelOptions(arch="ftd_fixnets:Small")


@pytest.fixture
def source(nets, tmp_path):
    torch.manual_seed(0)
    model = nets.Small(num_classes=5).eval()
    src = tmp_path / "src.pt"
    torch.save(model.state_dict(), src)
    x, y = make_data(tmp_path / "d.npz", n=48)
    return model, src, x


def test_rifle_redraws_the_head_and_nothing_else(source, tmp_path):
    model, src, _ = source
    fix(src, "rifle", out=tmp_path / "a.pt", model=ARCH, data=data_options(tmp_path / "d.npz"), seed=3)
    a, b = torch.load(src, weights_only=True), torch.load(tmp_path / "a.pt", weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) == (not k.startswith("fc.")), k
    bound = 1 / math.sqrt(32)                                  # torch-default: U(±1/sqrt(fan_in))
    assert float(b["fc.weight"].abs().max()) <= bound and float(b["fc.bias"].abs().max()) <= bound
    fix(src, "rifle", out=tmp_path / "b.pt", model=ARCH, data=data_options(tmp_path / "d.npz"), seed=3)
    fix(src, "rifle", out=tmp_path / "c.pt", model=ARCH, data=data_options(tmp_path / "d.npz"), seed=4)
    w = [torch.load(tmp_path / f"{n}.pt", weights_only=True)["fc.weight"] for n in "abc"]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])       # --seed fixes the draw


def test_rifle_kaiming_normal(source, tmp_path):
    _, src, _ = source
    res = fix(src, "rifle", out=tmp_path / "k.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
              options=RifleOptions(init="kaiming-normal"))
    b = torch.load(tmp_path / "k.pt", weights_only=True)
    assert float(b["fc.bias"].abs().max()) == 0.0
    assert float(b["fc.weight"].std()) == pytest.approx(math.sqrt(2 / 32), rel=0.25)
    assert {c.name: c.passed for c in res.outcome.checks}["other_tensors_identical"] is True
    with pytest.raises(FtdoctorError, match="--init"):
        fix(src, "rifle", out=tmp_path / "z.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
            options=RifleOptions(init="xavier"))


def channel_stats(out: torch.Tensor, dim: int):
    z = out.double().movedim(dim, -1).reshape(-1, out.shape[dim])
    return z.mean(0), z.std(0, unbiased=False)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_datadep_head_channels_have_mean_beta_and_unit_std(source, nets, tmp_path, beta):
    model, src, x = source
    fix(src, "datadep", out=tmp_path / "d.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
        options=DatadepOptions(beta=beta))
    fresh = nets.Small(num_classes=5)
    fresh.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    with torch.no_grad():
        mean, std = channel_stats(fresh.eval()(x), -1)
    assert torch.allclose(mean, torch.full_like(mean, beta), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)
    for k, v in model.state_dict().items():                  # only the head moved
        assert torch.equal(v, fresh.state_dict()[k]) == (not k.startswith("fc.")), k


def test_datadep_on_conv_layers_in_forward_order(source, nets, tmp_path):
    _, src, x = source
    res = fix(src, "datadep", out=tmp_path / "d.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
              options=DatadepOptions(layers=("features.*",)))
    assert res.outcome.parameters["layers"] == ["features.0", "features.3"]
    fresh = nets.Small(num_classes=5).eval()
    fresh.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    seen = {}
    for name in ("features.0", "features.3"):
        fresh.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o.detach()))
    with torch.no_grad():
        fresh(x)
    for name in ("features.0", "features.3"):                 # features.3 sees features.0 already re-drawn
        mean, std = channel_stats(seen[name], 1)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4), name
        assert torch.allclose(std, torch.ones_like(std), atol=1e-4), name
    with pytest.raises(FtdoctorError, match="matches no affine layer"):
        fix(src, "datadep", out=tmp_path / "e.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
            options=DatadepOptions(layers=("nope*",)))
