"""The training-loop API (ftdoctor.train): ENTAME head, FeatureNorm, L2SP, RifleSchedule, the docs' example."""
from __future__ import annotations

import copy
import io
import math
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.featurenorm import FeatureNorm as FeatureNormOrig
from ftdoctor.train import (L2SP, FeatureNorm, FeatureNormLinear, RifleSchedule, attach_head, entame_init_,
                            entame_phi_w, param_groups)

from helpers import SmallCNN

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_feature_norm_is_reexported():
    assert FeatureNorm is FeatureNormOrig


def test_entame_init_draws_n0phi_and_zero_bias():
    head = nn.Linear(400, 50)
    entame_init_(head, phi_w=1e-4, generator=torch.Generator().manual_seed(3))
    w = head.weight.detach().double()
    # 20 000 draws of N(0, 1e-4): the sample variance is within 3% of 1e-4 (sd of the estimate ≈ 1%)
    assert abs(float(w.var()) / 1e-4 - 1) < 0.03
    assert abs(float(w.mean())) < 3 * 1e-2 / math.sqrt(w.numel())
    assert torch.count_nonzero(head.bias) == 0


def test_entame_head_gives_max_entropy_loss():
    """ENTAME §5: with φ_w = 1e-12 the estimates are uniform, so the cross-entropy is ln C (eq. 19).

    The logits are ~‖x‖·1e-6 ≈ 1e-5, and CE − ln C is first order in them; a He head is off by O(1).
    """
    torch.manual_seed(0)
    head = nn.Linear(64, 7)
    entame_init_(head)
    x = torch.randn(32, 64) * 3
    y = torch.randint(0, 7, (32,))
    with torch.no_grad():
        assert abs(float(F.cross_entropy(head(x), y)) - math.log(7)) < 1e-4


def test_entame_phi_w_formula():
    assert entame_phi_w(1e-4, 10.0, 5) == pytest.approx((1e-4 * 10 / 5) ** 2, rel=1e-12)


def test_attach_head_replaces_only_the_head():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    head = attach_head(model, 4, init="entame", example=x)
    assert head.name == "fc" and head.module.out_features == 4
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k
    assert float(head.module.weight.detach().abs().max()) < 1e-4          # N(0, 1e-12): |w| ≈ 1e-6
    assert model(x).shape == (2, 4)


def test_attach_head_with_feature_norm_keeps_names_and_normalises():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    x = torch.randn(16, 3, 16, 16)
    head = attach_head(model, 3, init="kaiming", feature_norm=True, example=x)
    assert isinstance(model.fc, FeatureNormLinear) and head.module is model.fc
    assert set(model.state_dict()) - set(SmallCNN(num_classes=3).state_dict()) == \
        {"fc.feature_norm.mean", "fc.feature_norm.var"}
    raw, seen = [], []
    model.fc.register_forward_pre_hook(lambda m, a: raw.append(a[0].detach()), prepend=True)
    model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.train()
    model(x)
    f = raw[0]
    expected = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5)      # ENTAME eq. 20, train
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert torch.equal(model.fc.feature_norm.mean, f.mean(0))                     # stored for eval


def test_attach_head_unknown_init_is_an_error():
    with pytest.raises(FtdoctorError):
        attach_head(SmallCNN(), 3, init="nope", example=torch.randn(2, 3, 16, 16))


# -- L2SP ---------------------------------------------------------------------------------------
def _perturbed(seed: int = 0):
    torch.manual_seed(seed)
    ref = SmallCNN(num_classes=10)
    model = copy.deepcopy(ref)
    model.fc = nn.Linear(32, 4)                    # a new head: a different shape
    with torch.no_grad():
        for p in model.features.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, ref


def test_l2sp_matches_brute_force_and_detects_new_layers_by_shape():
    model, ref = _perturbed()
    pen = L2SP(model, ref, alpha=0.3, beta=0.02)
    assert set(pen.new) == {"fc.weight", "fc.bias"}
    assert set(pen.shared) == {n for n, _ in model.named_parameters()} - {"fc.weight", "fc.bias"}
    ref_sd = ref.state_dict()
    with torch.no_grad():
        sp = sum(float(((p.double() - ref_sd[n].double()) ** 2).sum())
                 for n, p in model.named_parameters() if not n.startswith("fc."))
        new = float((model.fc.weight.double() ** 2).sum() + (model.fc.bias.double() ** 2).sum())
        assert float(pen()) == pytest.approx(0.15 * sp + 0.01 * new, rel=1e-5)
        assert float(pen.sp_distance()) == pytest.approx(sp, rel=1e-5)


def test_l2sp_gradient_is_alpha_delta_and_beta_w():
    model, ref = _perturbed(1)
    pen = L2SP(model, ref.state_dict(), alpha=0.5, beta=0.1)
    pen().backward()
    w, w0 = model.features[0].weight, ref.features[0].weight
    assert torch.allclose(w.grad, 0.5 * (w - w0).detach(), atol=1e-7)
    assert torch.allclose(model.fc.weight.grad, 0.1 * model.fc.weight.detach(), atol=1e-7)


def test_l2sp_same_shape_head_is_new_only_when_named():
    torch.manual_seed(0)
    ref = SmallCNN(num_classes=5)
    model = copy.deepcopy(ref)
    assert "fc.weight" in L2SP(model, ref).shared
    pen = L2SP(model, ref, new=["fc"])
    assert set(pen.new) == {"fc.weight", "fc.bias"}


def test_l2sp_reference_is_a_snapshot():
    model, ref = _perturbed(2)
    pen = L2SP(model, ref, alpha=1.0, beta=0.0)
    with torch.no_grad():
        before = float(pen())
        for p in ref.parameters():
            p.add_(1.0)
        assert float(pen()) == before


def test_l2sp_rejects_negative_strength():
    model, ref = _perturbed()
    with pytest.raises(FtdoctorError):
        L2SP(model, ref, alpha=-1.0)


# -- RifleSchedule ------------------------------------------------------------------------------
def test_rifle_learning_rate_is_a_cosine_restarting_each_period():
    head = nn.Linear(4, 3)
    opt = torch.optim.SGD([{"params": list(head.parameters()), "lr": 0.2}])
    sched = RifleSchedule(head, opt, period=8)
    lrs = [sched.lr_at(t) for t in range(24)]
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * (t % 8) / 8)), abs=1e-15)
    assert lrs[0] == lrs[8] == lrs[16] == pytest.approx(0.2)
    assert lrs[4] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[:7], lrs[1:8]))           # annealed within a period


def test_rifle_reinitialises_exactly_at_period_boundaries():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3)
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.Adam(param_groups(model, model.fc, lr=1e-2))
    sched = RifleSchedule(model.fc, opt, period=3, seed=7)
    prev = model.fc.weight.detach().clone()
    for t in range(10):
        did = sched.step(t)
        w = model.fc.weight.detach().clone()
        if t in (3, 6, 9):
            assert did
            fw, fb = sched.fresh_head(t // 3)
            assert torch.equal(w, fw) and torch.equal(model.fc.bias.detach(), fb)
            assert all(p not in opt.state for p in model.fc.parameters())   # stale moments dropped
        else:
            assert not did and torch.equal(w, prev)
        assert opt.param_groups[1]["lr"] == pytest.approx(sched.lr_at(t))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        prev = model.fc.weight.detach().clone()
    assert sched.reinitialised == [3, 6, 9]
    # torch-default draws: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    fw, _ = sched.fresh_head(1)
    assert float(fw.abs().max()) <= 1 / math.sqrt(32)


def test_rifle_needs_the_head_in_its_own_group():
    model = SmallCNN(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FtdoctorError, match="parameter group"):
        RifleSchedule(model.fc, opt, period=5)
    with pytest.raises(FtdoctorError):
        RifleSchedule(model.fc, torch.optim.SGD(param_groups(model, model.fc, 0.1)), period=0)


# -- the example of docs/python-api.md -------------------------------------------------------------------------
def _readme_example() -> str:
    text = API_PAGE.read_text(encoding="utf-8") if API_PAGE.exists() else ""
    m = re.search(r"<!-- example: train-loop -->\s*```python\n(.*?)```", text, re.S)
    assert m, ("docs/python-api.md has no training-loop example (a ```python block after "
               "'<!-- example: train-loop -->')")
    return m.group(1)


def test_docs_training_loop_example_runs():
    code = _readme_example()
    ns: dict = {"__name__": "readme_example"}
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "docs/python-api.md:train-loop", "exec"), ns)
    assert ns["rifle"].reinitialised == [3, 6]
    assert isinstance(ns["model"].classifier[2], FeatureNormLinear)
    assert math.isfinite(ns["loss"].item())
    assert "head re-initialised at steps [3, 6]" in out.getvalue()
