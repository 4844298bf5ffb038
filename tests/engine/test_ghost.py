"""grad_norm_sq_sum (ghost norms) against a brute-force loop over single examples with autograd.

With ℓ_n = η_n · layer(x_n), the gradient at the layer's output is η, so ``grad_norm_sq_sum(layer, x, η)``
must be Σ_n ‖∂ℓ_n/∂θ‖², one example at a time — for the Gram-matrix form (small maps, short sequences, 1×1)
and for the shapes it leaves to the per-element squares.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ftdoctor.engine.ghost import _cheaper, grad_norm_sq_sum

F64 = torch.float64


def brute_force(layer: nn.Module, x: torch.Tensor, eta: torch.Tensor) -> tuple[float, float | None]:
    w2, b2 = 0.0, 0.0
    for n in range(x.shape[0]):
        layer.zero_grad()
        (eta[n:n + 1] * layer(x[n:n + 1])).sum().backward()
        w2 += float((layer.weight.grad.double() ** 2).sum())
        if getattr(layer, "bias", None) is not None:
            b2 += float((layer.bias.grad.double() ** 2).sum())
    return w2, (b2 if getattr(layer, "bias", None) is not None else None)


def check(layer: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        eta = torch.randn_like(layer(x))
    want_w, want_b = brute_force(layer, x, eta)
    got_w, got_b = grad_norm_sq_sum(layer, x, eta)
    assert got_w.dtype == F64 and got_w.dim() == 0
    assert abs(float(got_w) - want_w) <= tol * want_w
    if want_b is None:
        assert got_b is None
    else:
        assert abs(float(got_b) - want_b) <= tol * want_b


@pytest.mark.parametrize("shape", [(5, 12), (5, 3, 12), (4, 2, 3, 12), (7, 1, 12)])
def test_linear(shape):
    torch.manual_seed(0)
    check(nn.Linear(12, 40).to(F64), torch.randn(*shape, dtype=F64))


def test_linear_long_sequence_takes_the_per_element_squares():
    torch.manual_seed(0)
    assert not _cheaper(50, 4, 6)
    check(nn.Linear(6, 4, bias=False).to(F64), torch.randn(3, 50, 6, dtype=F64))


@pytest.mark.parametrize("kw,size", [
    (dict(kernel_size=3, padding=1), 4),                          # small map: Gram matrices
    (dict(kernel_size=3, padding=1), 12),                         # larger map: per-element squares
    (dict(kernel_size=3, stride=2, padding=1, dilation=1), 5),
    (dict(kernel_size=(3, 2), padding="same", dilation=(1, 2)), 4),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), 4),
    (dict(kernel_size=3, padding=1, groups=2), 4),
    (dict(kernel_size=1), 1),
    (dict(kernel_size=3, padding=1, bias=False), 3),
])
def test_conv2d(kw, size):
    torch.manual_seed(0)
    check(nn.Conv2d(4, 64, **kw).to(F64), torch.randn(3, 4, size, size, dtype=F64))


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=2, stride=2, groups=4),
                                dict(kernel_size=3, padding="same", padding_mode="circular")])
def test_conv1d(kw):
    torch.manual_seed(0)
    check(nn.Conv1d(4, 32, **kw).to(F64), torch.randn(3, 4, 6, dtype=F64))


def test_conv3d_and_norm_layers_sum_their_per_element_squares():
    torch.manual_seed(0)
    check(nn.Conv3d(2, 8, 3, padding=1).to(F64), torch.randn(2, 2, 3, 3, 3, dtype=F64))
    check(nn.LayerNorm(6).to(F64), torch.randn(3, 5, 6, dtype=F64))
    check(nn.GroupNorm(2, 4).to(F64), torch.randn(3, 4, 5, dtype=F64))


def test_embedding_counts_repeated_ids_within_an_example_together():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, padding_idx=0).to(F64)
    ids = torch.tensor([[1, 2, 1, 0, 0], [3, 3, 3, 4, 0], [5, 6, 7, 8, 9]])
    check(emb, ids)


def test_float32_totals_agree_with_float64():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 64, 3, padding=1)
    x = torch.randn(16, 8, 4, 4)
    eta = torch.randn(16, 64, 4, 4)
    w32, b32 = grad_norm_sq_sum(conv, x, eta)
    w64, b64 = grad_norm_sq_sum(conv.to(F64), x.double(), eta.double())
    assert abs(float(w32) / float(w64) - 1) < 1e-6 and abs(float(b32) / float(b64) - 1) < 1e-6


@pytest.mark.parametrize("kernel,stride,dilation,size", [((3, 3), (1, 1), (1, 1), (6, 6)), ((3, 2), (2, 1), (1, 2), (7, 9)),
                                                         ((1, 1), (2, 2), (1, 1), (5, 5))])
def test_the_patch_gram_from_the_pixel_gram_equals_the_unfolded_patches_gram(kernel, stride, dilation, size):
    """⟨U_l, U_l'⟩ as a sum over taps of the pixel Gram equals the Gram of ``F.unfold``'s patches."""
    from ftdoctor.engine.ghost import _patch_gram
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, *size, dtype=F64)            # (N, G, Cg, H, W), already padded
    u = torch.nn.functional.unfold(x.flatten(1, 2).reshape(6, 4, *size), kernel, dilation=dilation, stride=stride)
    out = tuple((s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(size, kernel, stride, dilation))
    want = (u.transpose(1, 2) @ u).reshape(3, 2, *u.shape[2:], u.shape[2])
    got = _patch_gram(x, kernel, stride, dilation, out)
    assert torch.allclose(got, want.reshape(got.shape), rtol=1e-12, atol=1e-12)


def check_eta(layer: nn.Module, x: torch.Tensor, eta: torch.Tensor, tol: float = 1e-10) -> None:
    want_w, want_b = brute_force(layer, x, eta)
    got_w, got_b = grad_norm_sq_sum(layer, x, eta)
    assert abs(float(got_w) - want_w) <= tol * want_w
    assert abs(float(got_b) - want_b) <= tol * want_b


@pytest.mark.parametrize("pattern", ["padding at the end", "class token first", "last real token", "none live",
                                     "scattered"])
def test_positions_whose_output_gradient_is_zero_are_left_out_and_the_total_is_the_same(pattern):
    """Padding tokens and, in a classifier's last block, every token but the one it reads have a zero output
    gradient: the totals over the live positions only (cut, or gathered example by example) are the
    brute-force ones."""
    from ftdoctor.engine.ghost import _live
    torch.manual_seed(0)
    n, length = 5, 12
    layer = nn.Linear(8, 40).to(F64)
    x = torch.randn(n, length, 8, dtype=F64)
    eta = torch.randn(n, length, 40, dtype=F64)
    real = torch.tensor([3, 12, 7, 1, 5])
    if pattern == "padding at the end":
        eta[torch.arange(length)[None] >= real[:, None]] = 0
    elif pattern == "class token first":
        eta[:, 1:] = 0
    elif pattern == "last real token":
        keep = torch.zeros(n, length, dtype=torch.bool)
        keep[torch.arange(n), real - 1] = True
        eta[~keep] = 0
    elif pattern == "none live":
        eta.zero_()
    else:
        eta[:, ::2] = 0
    a, u, kept = _live(eta, x)
    expect = {"padding at the end": (12, 12), "class token first": (1, 1), "last real token": (1, None),
              "none live": (1, 1), "scattered": (6, None)}[pattern]
    assert (a.shape[1], kept) == expect
    if pattern == "none live":
        got_w, got_b = grad_norm_sq_sum(layer, x, eta)
        assert float(got_w) == 0.0 and float(got_b) == 0.0
        return
    check_eta(layer, x, eta)
    eta2 = eta.clone()
    if pattern == "padding at the end":          # every example shorter than the sequence: cut to 7 positions
        eta2[:, 7:] = 0
        assert _live(eta2, x)[2] == 7
        check_eta(layer, x, eta2)


def test_layers_reading_one_input_share_its_gram_and_an_in_place_change_forms_it_again():
    """Query, key and value projections read one hidden state: the second and third reuse the first's input
    Gram (InputGram), and each total is still the brute-force one; after the input changes in place the
    Gram is formed anew (its version counter moved), not reused."""
    from ftdoctor.engine.ghost import InputGram
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, dtype=F64)
    layers = [nn.Linear(12, 40).to(F64), nn.Linear(12, 40).to(F64), nn.Linear(12, 20, bias=False).to(F64)]
    grams = InputGram()
    for round_ in range(2):
        for layer in layers:
            with torch.no_grad():
                eta = torch.randn_like(layer(x))
            want_w, _ = brute_force(layer, x, eta)
            kept = grams.get(x)
            got_w, _ = grad_norm_sq_sum(layer, x, eta, grams)
            assert abs(float(got_w) - want_w) <= 1e-10 * want_w
            if layer is not layers[0]:
                assert kept is not None and grams.get(x) is kept      # reused, not formed again
        with torch.no_grad():
            x.mul_(2.0)
        assert grams.get(x) is None


@pytest.mark.parametrize("budget", [0, 20 * 3 * 8 + 20 * 40 * 8, None])   # the last two layers' gradients
def test_totals_held_until_read_equal_those_formed_in_the_hooks(budget, monkeypatch):
    """On the CPU the backward's hooks hold each layer's input and output gradient (up to DEFER_BYTES) and
    the totals are formed when ``grad_sq`` is read: the same figures as formed in the hooks (budget 0),
    partly held (a budget of two layers) or all held."""
    from ftdoctor.engine import capture as capture_mod
    from ftdoctor.model import AffineLayer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3)).to(F64)
    layers = [AffineLayer(str(i), model[i]) for i in (0, 2, 4)]
    x = torch.randn(5, 4, 6, dtype=F64)
    eta = torch.randn(5, 4, 3, dtype=F64)
    if budget is not None:
        monkeypatch.setattr(capture_mod, "DEFER_BYTES", budget)
    cap = capture_mod.Capture(layers, layers[-1], grad_sq=True, outputs=False, head_input=False)
    cap.squares, cap.phase = "totals", "grad_sq"
    with cap:
        (eta * model(x)).sum().backward()
        held = len(cap._pending)
        got = {k: float(v) for k, v in cap.grad_sq.items()}
    assert held == {0: 0, 20 * 3 * 8 + 20 * 40 * 8: 2, None: 3}[budget]
    # brute force: each example's own backward
    want = {layer.name: 0.0 for layer in layers}
    for n in range(x.shape[0]):
        model.zero_grad()
        (eta[n:n + 1] * model(x[n:n + 1])).sum().backward()
        for layer in layers:
            want[layer.name] += float((layer.module.weight.grad ** 2).sum())
    for name, w in want.items():
        assert abs(got[name] - w) <= 1e-10 * w
