"""The single pass leaves the model exactly as it found it."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from helpers import BNCNN, make_bundle
from ftdoctor import engine
from ftdoctor.engine import reference, stream
from ftdoctor.diagnose import ProbeOptions, probe_model


def test_model_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = BNCNN(num_classes=4)
    model.train()                                # probing must not leave it in eval, nor update BN stats
    model.fc.weight.requires_grad_(False)        # nor flip requires_grad flags
    before = copy.deepcopy(model.state_dict())
    ref = copy.deepcopy(model)
    bundle = make_bundle((3, 8, 8), n=32, num_classes=4)
    probe_model(model, bundle, ProbeOptions(seed=1), reference=ref)
    assert model.training and all(m.training for m in model.modules())
    assert model.fc.weight.requires_grad is False and model.fc.bias.requires_grad is True
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def _run(model, ref, bundle):
    run = probe_model(model, bundle, ProbeOptions(seed=2), reference=ref)
    return ({k: v.figures for k, v in run.results.items()},
            {(k, a): v.arrays[a].tobytes() for k, v in run.results.items() for a in v.arrays})


def test_overlapped_reference_forward_gives_the_same_report(monkeypatch):
    # the reference's forward on a second thread during the backward passes: byte-identical figures
    torch.manual_seed(0)
    model = BNCNN(num_classes=4)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    bundle = make_bundle((3, 8, 8), n=40, num_classes=4, batch_size=8)
    monkeypatch.setattr(stream, "overlap_allowed", lambda *a: False)
    in_line = _run(model, ref, bundle)
    started = []
    real_start = reference.RefCapture.start
    monkeypatch.setattr(reference.RefCapture, "start",
                        lambda self, x: (real_start(self, x), started.append(self._thread is not None)))
    monkeypatch.setattr(stream, "overlap_allowed", lambda *a: True)
    monkeypatch.setattr(reference, "_OVERLAP_SPARE_CORES", -1e9)   # whatever this machine's load
    assert _run(model, ref, bundle) == in_line
    assert started == [False, False, True, True, True]      # two batches in line: they measure size and load
    monkeypatch.setattr(reference, "_OVERLAP_SPARE_CORES", 1e9)    # no idle core: always in line
    started.clear()
    assert _run(model, ref, bundle) == in_line and not any(started)


def test_an_error_in_the_overlapped_reference_reaches_the_caller(monkeypatch):
    class Failing(BNCNN):
        calls = 0

        def forward(self, x):
            Failing.calls += 1
            if Failing.calls == 4:     # a batch after the two in line
                raise RuntimeError("reference broke")
            return super().forward(x)

    torch.manual_seed(0)
    model, ref = BNCNN(num_classes=4), Failing(num_classes=4)
    monkeypatch.setattr(stream, "overlap_allowed", lambda *a: True)
    monkeypatch.setattr(reference, "_OVERLAP_SPARE_CORES", -1e9)
    with pytest.raises(RuntimeError, match="reference broke"):
        probe_model(model, make_bundle((3, 8, 8), n=40, num_classes=4, batch_size=8), ProbeOptions(), reference=ref)
    assert not any(t.name == "ftdoctor-reference" for t in threading.enumerate())


def test_overlap_only_where_it_pays_and_is_safe(monkeypatch):
    model, other = BNCNN(), BNCNN()
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert engine.overlap_allowed(model, other, "cpu")
    assert not engine.overlap_allowed(model, model, "cpu")                 # shared modules: hooks would cross
    assert not engine.overlap_allowed(model, nn.Sequential(other, model.fc), "cpu")
    assert not engine.overlap_allowed(model, other, "meta")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not engine.overlap_allowed(model, other, "cpu")            # spinning OpenMP teams would fight
        torch.set_num_threads(1)
        assert engine.overlap_allowed(model, other, "cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("loss, probes", [("random", ("change_rate",)), ("ce", ("change_rate",)),
                                          ("random", ("change_rate", "noise"))])
def test_a_backward_that_only_feeds_the_per_example_squares_forms_no_weight_gradient(loss, probes):
    """Exact mode asks autograd for the root layers' output gradients only, whichever loss the squares are
    of; a weight gradient is formed only for a probe that reads one (grad_norm: the cross-entropy's)."""
    torch.manual_seed(0)
    model = BNCNN(10)
    formed = []
    handles = [p.register_hook(lambda g, n=name: formed.append(n)) for name, p in model.named_parameters()]
    try:
        run = probe_model(model, make_bundle((3, 16, 16), n=12, num_classes=10, batch_size=6),
                          ProbeOptions(probes=probes, change_rate_loss=loss))
    finally:
        for h in handles:
            h.remove()
    assert formed == []
    assert all(layer["change_rate"] for layer in run.results["change_rate"].figures["layers"])
