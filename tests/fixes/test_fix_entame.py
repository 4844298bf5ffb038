"""``entame`` (ENTAME §5): ln C and the noise floor, checked by hand on the written files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fixhelp import data_flags, data_options, head_stats, make_data
from helpers import run_cli
from ftdoctor.checkpoint import ModelOptions, load_model
from ftdoctor.errors import FtdoctorError
from ftdoctor.featurenorm import FeatureNormLinear, attach_feature_norms
from ftdoctor.fixes import EntameOptions, FixFailed, fix

ARCH = ModelOptions(arch="ftd_fixnets:Small")
C = 5


@pytest.fixture
def source(nets, tmp_path):
    torch.manual_seed(0)
    model = nets.Small(num_classes=C).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)                           # a confident head: far from max entropy
    src = tmp_path / "src.pt"
    torch.save(model.state_dict(), src)
    x, y = make_data(tmp_path / "d.npz", n=64, num_classes=C)
    return model, src, x, y


@pytest.mark.parametrize("feature_norm", [False, True])
def test_entame_reaches_ln_c_and_the_noise_floor(source, nets, tmp_path, feature_norm):
    model, src, x, y = source
    ce0, nf0 = head_stats(model(x).detach(), y)
    assert nf0 - 1 / (C - 1) > 0.01                         # really above the floor before
    out = tmp_path / "fixed.pt"
    res = fix(src, "entame", out=out, model=ARCH, data=data_options(tmp_path / "d.npz"),
              options=EntameOptions(feature_norm=feature_norm))
    state = torch.load(out, weights_only=True)
    fresh = nets.Small(num_classes=C)
    notes = attach_feature_norms(fresh, state)               # what a user does (a no-op without the norm)
    assert bool(notes) == feature_norm
    fresh.load_state_dict(state)
    with torch.no_grad():
        ce, nf = head_stats(fresh.eval()(x), y)
    assert abs(ce - math.log(C)) < 1e-3
    assert abs(nf - 1 / (C - 1)) < 1e-3
    changed = {k for k in state if k not in model.state_dict() or not torch.equal(state[k], model.state_dict()[k])}
    assert changed <= {"fc.weight", "fc.bias", "fc.feature_norm.mean", "fc.feature_norm.var"}
    assert {"fc.weight", "fc.bias"} <= changed
    assert float(state["fc.weight"].std()) < 1e-5 and float(state["fc.bias"].abs().max()) == 0.0
    side = json.loads((tmp_path / "fixed.pt.ftdoctor.json").read_text())
    assert side["parameters"]["phi_w"] == 1e-12 and side["parameters"]["feature_norm"] == feature_norm
    assert res.outcome.figures["noise_after"]["noise_fraction"] == pytest.approx(nf, abs=1e-9)


def test_feature_norm_statistics_are_the_datas_and_ftdoctor_loads_them_back(source, tmp_path):
    model, src, x, y = source
    out = tmp_path / "fn.pt"
    fix(src, "entame", out=out, model=ARCH, data=data_options(tmp_path / "d.npz"),
        options=EntameOptions(feature_norm=True))
    with torch.no_grad():
        feats = model.features(x).double()
    state = torch.load(out, weights_only=True)
    assert torch.allclose(state["fc.feature_norm.mean"].double(), feats.mean(0), atol=1e-5)
    assert torch.allclose(state["fc.feature_norm.var"].double(), feats.var(0, unbiased=False), atol=1e-5)
    loaded = load_model(out, ARCH)                            # ftdoctor's own path re-inserts the norm
    assert isinstance(loaded.model.fc, FeatureNormLinear)
    with torch.no_grad():
        z = (feats - feats.mean(0)) / (feats.var(0, unbiased=False) + 1e-5).sqrt()
        want = z @ state["fc.weight"].double().T
        assert torch.allclose(loaded.model(x).double(), want, atol=1e-9)


def test_phi_w_from_lr_and_lam(source, tmp_path):
    _, src, _, _ = source
    res = fix(src, "entame", out=tmp_path / "o.pt", model=ARCH, data=data_options(tmp_path / "d.npz"),
              options=EntameOptions(lr=1e-4, lam=10.0))
    assert res.outcome.parameters["phi_w"] == pytest.approx((1e-4 * 10.0 / C) ** 2)
    w = torch.load(tmp_path / "o.pt", weights_only=True)["fc.weight"]
    assert float(w.std()) == pytest.approx(1e-4 * 10.0 / C, rel=0.3)


def test_contradictory_options_are_exit_2(source, tmp_path):
    _, src, _, _ = source
    for opts in (EntameOptions(phi_w=1e-6, lr=1e-3, lam=1.0), EntameOptions(lr=1e-3), EntameOptions(phi_w=-1.0)):
        with pytest.raises(FtdoctorError) as info:
            fix(src, "entame", out=tmp_path / "o.pt", model=ARCH, data=data_options(tmp_path / "d.npz"), options=opts)
        assert info.value.exit_code == 2
    assert not (tmp_path / "o.pt").exists()


def test_a_failed_verification_exits_1_and_writes_nothing(source, tmp_path):
    _, src, _, _ = source
    make_data(tmp_path / "big.npz", n=32, num_classes=C, scale=1e3)      # huge features …
    with pytest.raises(FixFailed) as info:                               # … and a wide head: far from uniform
        fix(src, "entame", out=tmp_path / "o.pt", model=ARCH, data=data_options(tmp_path / "big.npz", n=32),
            options=EntameOptions(phi_w=1.0))
    assert info.value.exit_code == 1 and "cross_entropy" in info.value.cause
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.pt.ftdoctor.json").exists()
    code, out, err = run_cli("fix", src, "--arch", "ftd_fixnets:Small", "--method", "entame", "--phi-w", "1",
                             *data_flags(tmp_path / "big.npz", n=32), "-o", tmp_path / "o.pt")
    assert code == 1 and "error:" in err and "hint:" in err and "✗" in out
    assert not (tmp_path / "o.pt").exists()


def test_new_head_for_a_different_class_count(source, nets, tmp_path):
    _, src, _, _ = source
    x, y = make_data(tmp_path / "d3.npz", n=30, num_classes=3)
    with pytest.raises(FtdoctorError, match="--new-head"):
        fix(src, "entame", out=tmp_path / "o.pt", model=ARCH, data=data_options(tmp_path / "d3.npz", n=30))
    fix(src, "entame", out=tmp_path / "o.pt", model=ARCH, data=data_options(tmp_path / "d3.npz", n=30), new_head=True)
    fresh = nets.Small(num_classes=3)
    fresh.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    with torch.no_grad():
        ce, nf = head_stats(fresh.eval()(x), y)
    assert abs(ce - math.log(3)) < 1e-3 and abs(nf - 0.5) < 1e-3
