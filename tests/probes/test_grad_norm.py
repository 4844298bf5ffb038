"""grad_norm against direct autograd (RIFLE §4.6.1)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers import SmallCNN, make_bundle
from ftdoctor.diagnose import ProbeOptions, probe_model


def test_equals_direct_autograd():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4).eval()
    bundle = make_bundle((3, 8, 8), n=40, num_classes=4, batch_size=16)
    res = probe_model(model, bundle, ProbeOptions(probes=("grad_norm",))).results["grad_norm"]
    names = [l["name"] for l in res.figures["layers"]]
    assert names == ["features.0", "features.3", "fc"]
    mods = dict(model.named_modules())
    per_batch = {n: [] for n in names}
    bias_norms = {n: [] for n in names}
    sums = {n: 0 for n in names}
    for i in range(0, 40, 16):
        loss = F.cross_entropy(model(bundle.x[i:i + 16]), bundle.y[i:i + 16])
        gs = torch.autograd.grad(loss, [p for n in names for p in (mods[n].weight, mods[n].bias)])
        for j, n in enumerate(names):
            per_batch[n].append(gs[2 * j].norm().item())
            bias_norms[n].append(gs[2 * j + 1].norm().item())
            sums[n] = sums[n] + gs[2 * j]
    rows = {l["name"]: l for l in res.figures["layers"]}
    for n in names:
        gn = sum(per_batch[n]) / 3
        assert math.isclose(rows[n]["grad_norm"], gn, rel_tol=1e-5)
        assert math.isclose(rows[n]["full_grad_norm"], (sums[n] / 3).norm().item(), rel_tol=1e-5)
        assert math.isclose(rows[n]["weight_norm"], mods[n].weight.norm().item(), rel_tol=1e-5)
        assert math.isclose(rows[n]["relative"], gn / mods[n].weight.norm().item(), rel_tol=1e-5)
        assert math.isclose(rows[n]["bias_grad_norm"], sum(bias_norms[n]) / 3, rel_tol=1e-5)
        assert res.arrays[f"{n}/grad_norm_per_batch"].tolist() == pytest_approx(per_batch[n])
    head = sum(per_batch["fc"]) / 3
    assert math.isclose(res.figures["depth_ratio"], sum(per_batch["features.0"]) / 3 / head, rel_tol=1e-5)


def pytest_approx(values):
    import pytest
    return pytest.approx(values, rel=1e-5)
