"""The probe's per-example squares against two real peers on a tiny CNN: change_rate's G² with the
cross-entropy loss equals Opacus's per-sample gradients (``GradSampleModule``) and ``torch.func``'s
``vmap(grad)``, squared, summed over the examples and divided by their number, within 1e-5 relative on every
weight (float64, so that rounding does not hide a difference). ``benchmarks/peers.py`` times the same."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftdoctor.diagnose import ProbeOptions, probe_model

from helpers import BNCNN, SmallCNN, TensorBundle, make_bundle

F64 = torch.float64


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5).to(F64).eval()
    x, y = torch.randn(24, 3, 16, 16, dtype=F64), torch.randint(0, 5, (24,))
    run = probe_model(model, TensorBundle(x, y, 5, 8), ProbeOptions(probes=("change_rate",), change_rate_loss="ce"))
    g2 = {k[: -len("/grad_sq_mean")] + ".weight": torch.as_tensor(v)
          for k, v in run.results["change_rate"].arrays.items() if k.endswith("/grad_sq_mean")}
    assert set(g2) == {"features.0.weight", "features.3.weight", "fc.weight"}
    return model, x, y, g2


def close(ours: dict, theirs: dict) -> None:
    for name, a in ours.items():
        b = theirs[name]
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, name
        assert torch.allclose(a, b, rtol=1e-5, atol=0), name


def test_equal_to_opacus(case):
    opacus = pytest.importorskip("opacus")
    model, x, y, ours = case
    theirs = copy.deepcopy(model)
    for m in theirs.modules():           # Opacus's hooks refuse an in-place op on a hooked output: same function
        if isinstance(m, nn.ReLU):
            m.inplace = False
    gsm = opacus.GradSampleModule(theirs, loss_reduction="sum").train()
    sums: dict = {}
    for lo in range(0, len(y), 8):
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x[lo:lo + 8]), y[lo:lo + 8], reduction="sum").backward()
        for name, p in gsm.named_parameters():
            key = name.removeprefix("_module.")
            if key in ours:
                sums[key] = sums.get(key, 0) + (p.grad_sample ** 2).sum(0)
            p.grad_sample = None
    close(ours, {k: v / len(y) for k, v in sums.items()})


def test_equal_to_torch_func_vmap(case):
    from torch.func import functional_call, grad, vmap
    model, x, y, ours = case
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    close(ours, {k: (g ** 2).sum(0) / len(y) for k, g in per_example.items() if k in ours})


def test_a_model_opacus_cannot_take_is_still_measured():
    """BatchNorm has buffers Opacus refuses; the probe measures every affine layer of such a net."""
    opacus = pytest.importorskip("opacus")
    model = BNCNN(num_classes=5).eval()
    with pytest.raises(Exception):
        opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    run = probe_model(model, make_bundle((3, 16, 16), n=16, num_classes=5, batch_size=8),
                      ProbeOptions(probes=("change_rate",), change_rate_loss="ce"))
    rows = run.results["change_rate"].figures["layers"]
    affine = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [r["name"] for r in rows if r["role"] == "affine"] == affine
    assert all(r["change_rate"] is not None for r in rows)
