"""The live monitor in a plain PyTorch loop: its figures at a measuring step are ``probe``'s on the same model
state and the same examples (cross-entropy change rates), whatever the loop's loss scale, accumulation or
precision; the run itself is untouched and carries no hook between measuring steps."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TensorBundle, assert_figures_close
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.monitor import Monitor, Schedule


def _net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(72, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5)).to(dtype)


def _data(n=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 10, 10, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def _probe(state, pretrained, x, y, **opts):
    model = copy.deepcopy(pretrained)
    model.load_state_dict(state)
    options = ProbeOptions(change_rate_loss=opts.pop("loss", "ce"), **opts)
    return probe_model(model, TensorBundle(x, y, 5, batch_size=len(y)), options, reference=pretrained,
                       batch_size=len(y))


def _hooks(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return n + sum(1 for p in model.parameters() if p._backward_hooks)


def test_figures_at_a_measuring_step_equal_probe_of_the_same_state():
    model = _net()
    pretrained = copy.deepcopy(model)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = Monitor(model, schedule=Schedule(every=0, first=1, steps=(2,)))   # reference: the initial state
    states, seen = {}, {}
    for step in range(4):
        states[step] = copy.deepcopy(model.state_dict())
        monitor.begin(step, labels=y)
        F.cross_entropy(model(x), y).backward()
        m = monitor.end()
        if m is not None:
            seen[step] = m
        opt.step()
        opt.zero_grad()
    monitor.close()
    assert sorted(seen) == [0, 2]
    for step, m in seen.items():
        run = _probe(states[step], pretrained, x, y)
        assert set(m.figures) == set(run.results) == {"noise", "change_rate", "grad_norm", "r2", "drift"}
        for name, res in run.results.items():
            assert assert_figures_close(m.figures[name], res.figures.to_json(), rel=1e-9) > 0
        assert m.examples == 12
        assert m.loss == pytest.approx(float(F.cross_entropy(_probe_model_logits(states[step], x), y)), rel=1e-12)
    assert seen[2].scalars["ftdoctor/drift"] > 0 == seen[0].scalars["ftdoctor/drift"]
    assert set(seen[2].scalars) == {"ftdoctor/noise_fraction", "ftdoctor/excess_noise_fraction",
                                    "ftdoctor/change_rate_spread", "ftdoctor/depth_ratio",
                                    "ftdoctor/r2_median", "ftdoctor/drift", "ftdoctor/sp_penalty"}


def test_the_cv_is_opt_in_and_then_every_figure_equals_probe_s():
    """By default the monitor sums Σ_e G²_e per layer (engine.ghost), so its change_rate block has the rates
    and spreads but no cv; ``change_rate_cv=True`` keeps the per-element squares and the whole block."""
    model = _net()
    pretrained = copy.deepcopy(model)
    x, y = _data()
    state = copy.deepcopy(model.state_dict())
    blocks = {}
    for cv in (False, True):
        monitor = Monitor(model, schedule=Schedule(every=1), change_rate_cv=cv)
        monitor.begin(0, labels=y)
        F.cross_entropy(model(x), y).backward()
        blocks[cv] = monitor.end()
        monitor.close()
        model.zero_grad()
    truth = _probe(state, pretrained, x, y).results["change_rate"].figures.to_json()
    assert blocks[False].figures["change_rate"]["mode"] == "totals"
    assert all(l["cv"] is None for l in blocks[False].figures["change_rate"]["layers"])
    assert "ftdoctor/change_rate_cv" not in blocks[False].scalars
    assert blocks[True].figures["change_rate"]["mode"] == "exact"
    assert assert_figures_close(blocks[True].figures["change_rate"], truth, rel=1e-9) > 0
    assert assert_figures_close(blocks[False].figures["change_rate"], truth, rel=1e-9) > 0
    assert blocks[True].scalars["ftdoctor/change_rate_cv"] > 0


def test_r2_is_probe_s_on_the_held_examples_in_eval_mode_whatever_the_dropout():
    """R² compares the features of the model and the reference in eval mode on the first ``r2_examples``
    examples of the first measuring step, held for every later one: probe's R² of those examples, even with
    dropout in the loop's forward and a new batch at every step (at the first step the model is the
    reference: R² 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(512, 16),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5)).double()
    pretrained = copy.deepcopy(model)
    batches = [_data(seed=s) for s in (1, 2, 3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = Monitor(model, schedule=Schedule(every=1), r2_examples=5)
    seen = []
    for x, y in batches:
        state = copy.deepcopy(model.state_dict())
        monitor.begin(len(seen), labels=y)
        F.cross_entropy(model(x), y).backward()
        seen.append((state, monitor.end()))
        opt.step()
        opt.zero_grad()
    monitor.close()
    assert model.training and all(m.training for m in model.modules())
    first = seen[0][1].figures["r2"]["layers"]
    assert first and all(row["median"] == pytest.approx(1.0, abs=1e-12) for row in first)
    held_x, held_y = batches[0][0][:5], batches[0][1][:5]
    for state, m in seen:
        run = _probe(state, pretrained, held_x, held_y)
        assert assert_figures_close(m.figures["r2"], run.results["r2"].figures.to_json(), rel=1e-9) > 0
    assert seen[2][1].scalars["ftdoctor/r2_median"] < seen[1][1].scalars["ftdoctor/r2_median"] < 1


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_reference_runs_once_for_r2_until_its_weights_change(frozen):
    """The outputs of a frozen reference (no parameter requires a gradient, as the monitor's own copy) on the
    held examples are formed at the first measuring step and reused; an in-place change to it forms them
    again. A reference that could train (a fused optimizer changes it unseen) runs at every measuring step."""
    model = _net()
    reference = copy.deepcopy(model).requires_grad_(not frozen)
    calls = []
    reference[0].register_forward_hook(lambda *a: calls.append(1))
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, schedule=Schedule(every=1), reference=reference)
    figures = []
    for step in range(4):
        if step == 3:
            with torch.no_grad():
                reference[0].weight.mul_(2.0)
            state = copy.deepcopy(model.state_dict())
        monitor.begin(step, labels=y)
        F.cross_entropy(model(x), y).backward()
        figures.append(monitor.end().figures["r2"])
        opt.step()
        opt.zero_grad()
    monitor.close()
    assert len(calls) == (2 if frozen else 4)                      # frozen: steps 0 and 3
    truth = _probe(state, reference, x, y).results["r2"].figures.to_json()
    assert assert_figures_close(figures[3], truth, rel=1e-9) > 0


def _probe_model_logits(state, x):
    model = _net()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def test_gradient_accumulation_with_a_scaled_loss_is_one_batch_of_the_union():
    """Three micro-batches of 5, 5 and 2 examples, each loss its share of the step's mean and multiplied by a
    gradient scaler's 1024: the figures are probe's of the twelve examples as one batch."""
    model = _net()
    pretrained = copy.deepcopy(model)
    x, y = _data()
    monitor = Monitor(model, schedule=Schedule(every=1))
    state = copy.deepcopy(model.state_dict())
    monitor.begin(0)
    for lo, hi in ((0, 5), (5, 10), (10, 12)):
        monitor.set_labels(y[lo:hi])
        loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi]) * (hi - lo) / 12 * 1024.0
        loss.backward()
    m = monitor.end()
    monitor.close()
    run = _probe(state, pretrained, x, y)
    for name, res in run.results.items():
        assert_figures_close(m.figures[name], res.figures.to_json(), rel=1e-9)
    assert not m.notes


def test_bf16_autocast_on_the_cpu_matches_probe_in_bfloat16():
    model = _net(torch.float32)
    pretrained = copy.deepcopy(model)
    x, y = _data(dtype=torch.float32)
    monitor = Monitor(model, schedule=Schedule(every=1))
    state = copy.deepcopy(model.state_dict())
    monitor.begin(0, labels=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    m = monitor.end()
    monitor.close()
    assert m is not None and not m.notes
    run = _probe(state, pretrained, x, y, dtype="bfloat16")
    for name, res in run.results.items():
        assert_figures_close(m.figures[name], res.figures.to_json(), rel=2e-2)


def test_the_random_loss_change_rates_are_opt_in_and_equal_probe_s_default():
    model = _net()
    pretrained = copy.deepcopy(model)
    x, y = _data()
    monitor = Monitor(model, schedule=Schedule(every=1), random_change_rates=True, seed=3)
    state = copy.deepcopy(model.state_dict())
    monitor.begin(0, labels=y)
    F.cross_entropy(model(x), y).backward()
    m = monitor.end()
    monitor.close()
    run = _probe(state, pretrained, x, y, loss="random", seed=3)
    assert m.figures["change_rate"]["loss"] == "random"
    assert_figures_close(m.figures["change_rate"], run.results["change_rate"].figures.to_json(), rel=1e-9)


def test_the_run_is_unchanged_and_no_hook_stays_between_measuring_steps():
    def train(with_monitor: bool):
        model = _net()
        x, y = _data()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        monitor = Monitor(model, schedule=Schedule(every=2, first=1)) if with_monitor else None
        hooks = []
        for step in range(5):
            if monitor:
                monitor.begin(step, labels=y)
            F.cross_entropy(model(x), y).backward()
            if monitor:
                monitor.end()
                hooks.append(_hooks(model))
            opt.step()
            opt.zero_grad()
        return model, monitor, hooks
    plain, _, _ = train(False)
    watched, monitor, hooks = train(True)
    assert [m.step for m in monitor.history] == [0, 2, 4]
    assert hooks == [0] * 5
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values()):
        assert torch.equal(a, b)


def test_a_measurement_that_cannot_be_made_is_one_warning_and_the_run_goes_on(caplog):
    model = _net()
    x, y = _data()
    monitor = Monitor(model, schedule=Schedule(every=1), warn=True)
    with caplog.at_level(logging.WARNING, logger="ftdoctor.monitor"):
        for step in range(3):
            monitor.begin(step)                      # no labels: the forward does not get them either
            F.cross_entropy(model(x), y).backward()
            assert monitor.end() is None
    notes = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    assert len(notes) == 1 and "labels" in notes[0] and "step 0" in notes[0]
    monitor.begin(3, labels=y)
    F.cross_entropy(model(x), y).backward()
    assert monitor.end() is not None


def test_a_loss_that_is_not_the_cross_entropy_is_said():
    model = _net()
    x, y = _data()
    monitor = Monitor(model, schedule=Schedule(every=1))
    monitor.begin(0, labels=y)
    F.cross_entropy(model(x), y, label_smoothing=0.2).backward()
    m = monitor.end()
    assert m is not None and any("not the cross-entropy" in n for n in m.notes)


def test_a_finding_warns_once_with_its_action(caplog):
    model = _net()
    with torch.no_grad():
        model[-1].weight.mul_(40.0)                  # a loud fresh head: most of the first error is noise
    x, y = _data()
    monitor = Monitor(model, schedule=Schedule(every=1), reference=None)
    with caplog.at_level(logging.WARNING, logger="ftdoctor.monitor"):
        for step in range(2):
            monitor.begin(step, labels=y)
            F.cross_entropy(model(x), y).backward()
            m = monitor.end()
    noise = [r.getMessage() for r in caplog.records if "noise fraction" in r.getMessage()]
    assert len(noise) == 1 and noise[0].startswith("ftdoctor step 0:")
    assert "--method entame" in noise[0] and "entame=True" in noise[0]
    assert "r2" not in m.figures and "drift" not in m.figures
