"""Per-example squares of embeddings and normalisation layers against a per-example autograd loop, and Opacus."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ftdoctor.engine.norm_squares import norm_grad_sq_sum, supports_norm

F64 = torch.float64


def brute(layer: nn.Module, x: torch.Tensor, eta: torch.Tensor):
    """Σ_n (∂ℓ_n/∂θ)² with ℓ_n = η_n · layer(x_n), one example at a time."""
    w2 = torch.zeros_like(layer.weight)
    b2 = torch.zeros_like(layer.bias) if getattr(layer, "bias", None) is not None else None
    for n in range(x.shape[0]):
        layer.zero_grad()
        (eta[n:n + 1] * layer(x[n:n + 1])).sum().backward()
        w2 += layer.weight.grad ** 2
        if b2 is not None:
            b2 += layer.bias.grad ** 2
    return w2, b2


def check(layer: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        eta = torch.randn_like(layer(x), dtype=F64)
    want_w, want_b = brute(layer, x, eta)
    got_w, got_b = norm_grad_sq_sum(layer, x, eta)
    assert got_w.shape == layer.weight.shape
    assert ((got_w - want_w).abs().max() / want_w.abs().max()).item() < 1e-10
    if want_b is not None:
        assert ((got_b - want_b).abs().max() / want_b.abs().max()).item() < 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_embedding_with_repeated_tokens_and_padding():
    emb = nn.Embedding(11, 6, padding_idx=0).to(F64)
    ids = torch.randint(0, 11, (5, 9))
    ids[:, -3:] = 0                                   # padding, and repeats of the same token in a sentence
    ids[0, :4] = 3
    check(emb, ids)


def test_layer_norm_over_tokens_and_two_dims():
    check(nn.LayerNorm(8).to(F64), torch.randn(4, 7, 8, dtype=F64))
    check(nn.LayerNorm((3, 5)).to(F64), torch.randn(4, 2, 3, 5, dtype=F64))
    check(nn.LayerNorm(8, bias=False).to(F64), torch.randn(3, 8, dtype=F64))


def test_group_norm():
    layer = nn.GroupNorm(3, 6).to(F64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    check(layer, torch.randn(4, 6, 5, 5, dtype=F64))


def test_what_is_not_supported_says_why():
    assert "max_norm" in supports_norm(nn.Embedding(5, 3, max_norm=1.0))
    assert "elementwise_affine" in supports_norm(nn.LayerNorm(4, elementwise_affine=False))
    assert supports_norm(nn.Linear(2, 2)) is not None


def test_equal_to_opacus_grad_sample():
    """Opacus's GradSampleModule computes the same per-example gradients for these layers."""
    opacus = pytest.importorskip("opacus")
    model = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(F64)
    ids = torch.randint(0, 20, (6, 5))
    eta = torch.randn(6, 5, 3, dtype=F64)
    import copy

    plain = copy.deepcopy(model)
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    (eta * gsm(ids)).sum().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    model = plain
    emb, norm = model[0], model[1]
    with torch.no_grad():
        h = emb(ids)
        out_grad_norm = eta @ model[2].weight                  # ∂Σℓ/∂(LayerNorm output)
        y = norm(h)
    # gradient into the embedding's output, by autograd through the LayerNorm
    h_req = h.clone().requires_grad_(True)
    norm(h_req).backward(out_grad_norm)
    got_emb, _ = norm_grad_sq_sum(emb, ids, h_req.grad)
    got_ln_w, got_ln_b = norm_grad_sq_sum(norm, h, out_grad_norm)
    for got, name in ((got_emb, "0.weight"), (got_ln_w, "1.weight"), (got_ln_b, "1.bias")):
        want = (samples[name] ** 2).sum(0)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert y.shape == (6, 5, 8)
