"""The single pass leaves the model exactly as it found it."""
from __future__ import annotations

import copy

import torch

from conftest import BNCNN, make_bundle
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
