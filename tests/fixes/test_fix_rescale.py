"""``rescale`` (Krähenbühl §3.2): the solvers' algebra, and whole fixes verified from the written files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision

from fixhelp import brute_force_rates, data_flags, data_options, make_data, misscale_, rel_change
from helpers import run_cli
from ftdoctor.checkpoint import ModelOptions
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.fixes import RescaleOptions, fix
from ftdoctor.fixes.rescale import predicted_log_rates, solve_joint, solve_paper

CHAIN = ["a", "b", "c", "d"]                       # d is the head: fixed
PRODUCER = {"b": "a", "c": "b", "d": "c"}


def test_joint_flattens_a_chain_exactly():
    logs = {"a": 9.0, "b": -3.0, "c": 4.0, "d": 0.5}
    x = solve_joint(logs, ["a", "b", "c"], PRODUCER)
    after = predicted_log_rates(logs, x, PRODUCER)
    assert max(after.values()) - min(after.values()) < 1e-9
    assert "d" not in x                              # the head keeps r = 1


def test_joint_is_the_least_squares_optimum_when_a_layer_is_pinned():
    """With b not rescalable the system is over-determined: compare with a brute-force search."""
    logs = {"a": 2.0, "b": -1.0, "c": 3.0, "d": 0.0}
    producer = {"d": "c"}                             # a's and b's undo cannot be placed
    x = solve_joint(logs, ["c"], producer)

    def cost(xc):
        v = np.array(list(predicted_log_rates(logs, {"c": xc}, producer).values()))
        return float(((v - v.mean()) ** 2).sum())
    grid = np.linspace(-5, 5, 20001)
    best = grid[np.argmin([cost(g) for g in grid])]
    assert abs(x["c"] - best) < 1e-3


def test_paper_step_is_damped_towards_the_geometric_mean():
    logs = {"a": 2.0, "b": -1.0, "c": 3.0, "d": 0.0}
    x = solve_paper(logs, ["a", "b", "c"], damping=0.25)
    mean = np.mean(list(logs.values()))
    for n in ("a", "b", "c"):
        assert math.isclose(x[n], 0.125 * (logs[n] - mean))   # r_k = (c_k / C̄)^(α/2)
    after = predicted_log_rates(logs, x, {})
    assert math.isclose(after["a"] - mean, 0.75 * (logs["a"] - mean))   # a has no producer: (1 − α) of its gap


@pytest.fixture
def misscaled(nets, tmp_path):
    torch.manual_seed(1)
    model = misscale_(nets.PlainCNN(num_classes=5)).eval()
    src = tmp_path / "plain.pt"
    torch.save(model.state_dict(), src)
    x, y = make_data(tmp_path / "d.npz", n=32, shape=(3, 16, 16))
    return model, src, x


def spread_of(path, nets, tmp_path, n=32):
    from ftdoctor.checkpoint import load_model
    from ftdoctor.data import load_data
    model = load_model(path, ModelOptions(arch="ftd_fixnets:PlainCNN")).model
    bundle = load_data(data_options(tmp_path / "d.npz", n=n))
    return probe_model(model, bundle, ProbeOptions(probes=("change_rate",))).results["change_rate"].figures["spread"]


def test_default_rescale_flattens_a_misscaled_plain_cnn_and_keeps_its_logits(misscaled, nets, tmp_path):
    model, src, x = misscaled
    before = spread_of(src, nets, tmp_path)
    assert before > 1e6
    out = tmp_path / "fixed.pt"
    res = fix(src, "rescale", out=out, model=ModelOptions(arch="ftd_fixnets:PlainCNN"),
              data=data_options(tmp_path / "d.npz", n=32))
    fixed = nets.PlainCNN(num_classes=5)
    fixed.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert rel_change(model(x), fixed.eval()(x)) < 1e-4
    after = spread_of(out, nets, tmp_path)                     # measured independently of the fix
    assert after < 1.5                                         # Krähenbühl Fig. 1a: a flat curve
    assert res.outcome.figures["rounds"] == 1
    assert math.isclose(res.outcome.figures["spread_after"], after, rel_tol=1e-6)
    # a brute-force loop over examples agrees that the rates are flat
    names = [row["name"] for row in res.outcome.figures["layers"]]
    rates = brute_force_rates(fixed, x, names)
    assert max(rates.values()) / min(rates.values()) < 1.5
    side = json.loads((tmp_path / "fixed.pt.ftdoctor.json").read_text())
    assert side["verification"]["spread_before"] > 1e6 and side["verification"]["spread_after"] < 1.5
    assert side["left_alone"] == [{"name": "classifier.2", "reason": "the head: its scale is the model's output"}]


def test_paper_solver_runs_and_reports_its_rounds(misscaled, nets, tmp_path):
    model, src, x = misscaled
    code, out, err = run_cli("fix", src, "--arch", "ftd_fixnets:PlainCNN", "--method", "rescale", "--solver", "paper",
                             "--max-iterations", "3", *data_flags(tmp_path / "d.npz", n=32),
                             "-o", tmp_path / "paper.pt", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    v = doc["verification"]
    assert doc["parameters"]["solver"] == "paper" and doc["parameters"]["damping"] == 0.25
    assert v["rounds"] == 3 and len(v["spread_per_round"]) == 4
    assert 1.0 < v["spread_after"] < v["spread_before"]      # damped: better, not yet flat
    assert v["logit_change"] < 1e-4


def test_batchnorm_cnn_keeps_its_eval_logits(nets, tmp_path):
    torch.manual_seed(0)
    model = nets.BNNet(num_classes=5)
    x, _ = make_data(tmp_path / "d.npz", n=32)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(x * 4 + 2)                                   # statistics far from the data's
    model.eval()
    src = tmp_path / "bn.pt"
    torch.save(model.state_dict(), src)
    res = fix(src, "rescale", out=tmp_path / "bn_fix.pt", model=ModelOptions(arch="ftd_fixnets:BNNet"),
              data=data_options(tmp_path / "d.npz", n=32))
    fixed = nets.BNNet(num_classes=5)
    fixed.load_state_dict(torch.load(tmp_path / "bn_fix.pt", weights_only=True))
    with torch.no_grad():
        assert rel_change(model(x), fixed.eval()(x)) < 1e-4
    assert res.outcome.figures["spread_after"] < 1.5
    assert {r["undo"] for r in res.outcome.figures["layers"] if r["undo"]} == {"batchnorm"}


def test_resnet18_runs_keeps_logits_and_lists_what_it_left_alone(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    src = tmp_path / "r18.pth"
    torch.save(model.state_dict(), src)
    x, _ = make_data(tmp_path / "d.npz", n=5, shape=(3, 16, 16))
    res = fix(src, "rescale", out=tmp_path / "r18_fix.pth", model=ModelOptions(arch="resnet18"),
              data=data_options(tmp_path / "d.npz", n=5, batch_size=5), options=RescaleOptions(max_iterations=1))
    fixed = torchvision.models.resnet18(num_classes=5)
    fixed.load_state_dict(torch.load(tmp_path / "r18_fix.pth", weights_only=True))
    with torch.no_grad():
        assert rel_change(model(x), fixed.eval()(x)) < 1e-4
    assert [(l.name, l.reason) for l in res.outcome.left_alone] == [("fc", "the head: its scale is the model's output")]
    assert res.outcome.figures["spread_after"] < res.outcome.figures["spread_before"]
