"""FeatureNorm (ENTAME eq. 20) against torch's own batch norm, and the FeatureNormLinear head."""
from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

from ftdoctor.featurenorm import (FeatureNorm, FeatureNormLinear, attach_feature_norms, feature_norm_keys,
                                  feature_statistics, insert_feature_norm)


def test_train_mode_is_batch_norm_without_parameters_and_keeps_the_detached_statistics():
    torch.manual_seed(0)
    x = (torch.randn(32, 6) * 3 + 2).requires_grad_(True)
    fn = FeatureNorm(6).train()
    out = fn(x)
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)          # independent implementation
    assert torch.allclose(out, ref, atol=1e-6)
    g_out, = torch.autograd.grad(out.pow(3).sum(), x)                  # gradients flow through μ_N, σ_N
    g_ref, = torch.autograd.grad(ref.pow(3).sum(), x)
    assert torch.allclose(g_out, g_ref, atol=1e-4)
    assert torch.allclose(fn.mean, x.detach().mean(0)) and not fn.mean.requires_grad
    assert torch.allclose(fn.var, x.detach().var(0, unbiased=False))
    assert not list(fn.parameters())


def test_eval_mode_uses_the_last_training_batch_not_a_running_average():
    fn = FeatureNorm(4)
    a, b = torch.randn(16, 4) + 5, torch.randn(16, 4) * 2 - 1
    fn.train()
    fn(a)
    fn(b)
    fn.eval()
    x = torch.randn(8, 4)
    want = F.batch_norm(x, b.mean(0), b.var(0, unbiased=False), training=False, eps=1e-5)
    assert torch.allclose(fn(x), want, atol=1e-6)


def test_tokens_are_normalised_over_every_position_but_the_last():
    x = torch.randn(4, 7, 5) * 2 + 1
    fn = FeatureNorm(5).train()
    out = fn(x)
    flat = out.reshape(-1, 5)
    assert torch.allclose(flat.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(flat.var(0, unbiased=False), torch.ones(5), atol=1e-3)


def test_feature_statistics_streams_the_same_numbers_as_a_concatenation():
    parts = [torch.randn(n, 3) * 4 + 1 for n in (5, 11, 2)]
    mean, var = feature_statistics(parts)
    whole = torch.cat(parts).double()
    assert torch.allclose(mean, whole.mean(0)) and torch.allclose(var, whole.var(0, unbiased=False))


def net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_feature_norm_linear_is_linear_of_normalised_features_and_hooks_see_them():
    torch.manual_seed(0)
    model = net()
    head = insert_feature_norm(model, "2")
    assert isinstance(model[2], FeatureNormLinear) and isinstance(model[2], nn.Linear)
    x = torch.randn(10, 4)
    feats = model[1](model[0](x))
    head.feature_norm.set_statistics(feats.mean(0), feats.var(0, unbiased=False))
    model.eval()
    seen = []
    handle = head.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    z = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(seen[0], z, atol=1e-5)                        # probes see what W multiplies
    assert torch.allclose(out, F.linear(z, head.weight, head.bias), atol=1e-5)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                        "2.feature_norm.mean", "2.feature_norm.var"]


def test_state_dicts_pickles_and_copies_round_trip():
    torch.manual_seed(0)
    model = net()
    insert_feature_norm(model, "2").feature_norm.set_statistics(torch.arange(6.0), torch.arange(1.0, 7.0))
    model.eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x)
    state = model.state_dict()
    assert feature_norm_keys(state) == ["2"]
    fresh = net()
    notes = attach_feature_norms(fresh, state)                          # a user's fresh architecture
    assert len(notes) == 1 and "2" in notes[0]
    fresh.load_state_dict(state)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (fresh.eval(), torch.load(buf, weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.allclose(other(x), want)
    assert attach_feature_norms(net(), net().state_dict()) == []        # nothing to do without the keys
