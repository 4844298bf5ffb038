"""The noise probe against hand computation and ENTAME's closed forms (eqs. 12–17)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers import SmallCNN, make_bundle
from ftdoctor.diagnose import ProbeOptions, install_new_head, probe_model
from ftdoctor.model import find_head, forward_order
from ftdoctor.stats import t_ppf


def test_figures_equal_a_hand_computation():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5).eval()
    bundle = make_bundle((3, 8, 8), n=40, num_classes=5, batch_size=16)
    fig = probe_model(model, bundle, ProbeOptions(probes=("noise",))).results["noise"].figures
    with torch.no_grad():
        logits = model(bundle.x).double()
        feats = model.features(bundle.x).double()
    p = logits.softmax(1)
    y = F.one_hot(bundle.y, 5).double()
    zeta = (p ** 2).sum(1).mean().item()
    kappa = (p * y).sum(1).mean().item()
    phi = zeta + 1 - 2 * kappa
    e = p - y
    want = {"estimate_energy": zeta, "label_energy": 1.0, "correct_prob": kappa, "total_energy": phi,
            "noise_fraction": zeta / phi, "excess_noise_fraction": (zeta - 0.2) / phi,
            "max_entropy_noise_fraction": 0.25, "cross_entropy": F.cross_entropy(logits, bundle.y).item(),
            "max_entropy_loss": math.log(5), "mean_entropy": -(p * p.log()).sum(1).mean().item(),
            "backbone_error_energy": ((e @ model.fc.weight.double()) ** 2).sum(1).mean().item(),
            "feature_energy": (feats ** 2).sum(1).mean().item()}
    for k, v in want.items():
        assert math.isclose(fig[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, fig[k], v)


def test_zero_head_reaches_max_entropy():
    model = SmallCNN(num_classes=7).eval()
    model.fc.weight.data.zero_()
    model.fc.bias.data.zero_()
    bundle = make_bundle((3, 8, 8), n=30, num_classes=7)
    fig = probe_model(model, bundle, ProbeOptions(probes=("noise",))).results["noise"].figures
    assert abs(fig["cross_entropy"] - math.log(7)) < 1e-6
    assert abs(fig["noise_fraction"] - 1 / 6) < 1e-6
    assert abs(fig["excess_noise_fraction"]) < 1e-6


def test_seeds_ci_is_a_t_interval_and_backbone_runs_once_per_batch():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3).eval()
    bundle = make_bundle((3, 8, 8), n=40, num_classes=6, batch_size=16)   # 3 batches
    layers = forward_order(model, bundle.x[:1])
    head = install_new_head(model, find_head(layers), 6, "kaiming", seed=0)
    layers = [head if l.name == head.name else l for l in layers]
    calls = []
    model.features.register_forward_hook(lambda *a: calls.append(1))
    run = probe_model(model, bundle, ProbeOptions(probes=("noise",), new_head=True, seeds=5), layers=layers)
    res = run.results["noise"]
    assert len(calls) == 3                      # once per batch, not 5 times
    per = res.arrays["per_seed/noise_fraction"]
    assert len(per) == 5 and len(set(per.tolist())) == 5
    mean = sum(per) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in per) / 4)
    assert math.isclose(res.figures["noise_fraction"], mean, rel_tol=1e-12)
    assert math.isclose(res.figures["noise_fraction_ci95"], t_ppf(0.975, 4) * sd / math.sqrt(5), rel_tol=1e-9)
    assert abs(t_ppf(0.975, 4) - 2.7764451051977987) < 1e-9
    # seed 0's head is the one installed in the model: its figures equal a plain run
    plain = probe_model(model, bundle, ProbeOptions(probes=("noise",)), layers=layers).results["noise"]
    assert math.isclose(per[0], plain.figures["noise_fraction"], rel_tol=1e-9)
