"""Sums of squared per-example gradients of embeddings and normalisation layers (beyond BackPACK, which skips them).

From the layer's input ``x`` and the gradient ``g = ∂(Σ_n ℓ_n)/∂out`` the engine captured (SPEC §1.2), per
example ``n`` and summed over every position ``t`` the parameter is shared across:

* ``nn.Embedding`` (``out_{n,t} = W[id_{n,t}]``): ``∂ℓ_n/∂W[v] = Σ_{t: id_{n,t}=v} g_{n,t}``. The rows a token
  touches are summed per example by one ``index_add`` over (example, token id) keys, squared and added into
  ``W``'s shape — no ``V × D`` tensor per example. The row ``padding_idx`` gets no gradient, as in PyTorch.
* ``nn.LayerNorm`` (``out = x̂ ⊙ γ + β``, ``x̂`` normalised over the last dims with the layer's ε):
  ``∂ℓ_n/∂γ = Σ_t g_{n,t} ⊙ x̂_{n,t}``, ``∂ℓ_n/∂β = Σ_t g_{n,t}``.
* ``nn.GroupNorm`` (channels in dim 1, ``x̂`` normalised per example and group over channels and positions):
  ``∂ℓ_n/∂γ_c = Σ_p g_{n,c,p} x̂_{n,c,p}``, ``∂ℓ_n/∂β_c = Σ_p g_{n,c,p}``.

``x̂`` is recomputed from ``x`` by the layer's own kernel (``F.layer_norm`` / ``F.group_norm`` without the
affine part: population variance, ε inside the root), so these are the true per-example gradients in ``eval()`` as in ``train()`` (neither layer keeps running
statistics).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: subclasses with their own forward (timm's LayerNorm, ...) checked on data to compute their base's function
VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def role(module: nn.Module) -> str:
    """How the probes count a measured layer: ``affine`` (Linear, Conv), ``embedding`` (an affine map of a
    one-hot input: counted with them), ``norm`` (LayerNorm / GroupNorm scale and shift: reported, not part of
    the spread or the depth ratio — their weights sit near 1 and no rescaling moves them)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    return "affine"


def supports_norm(module: nn.Module) -> str | None:
    """``None`` if :func:`norm_grad_sq_sum` handles ``module``, else why not."""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "Embedding with max_norm renormalises its weight in the forward pass"
        if module.sparse:
            return "a sparse Embedding's gradient is not measured"
        base = nn.Embedding
    elif isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.weight is None:
            return "LayerNorm without elementwise_affine has no weight"
        base = nn.LayerNorm
    elif isinstance(module, nn.GroupNorm):
        if not module.affine:
            return "GroupNorm without affine has no weight"
        base = nn.GroupNorm
    else:
        return f"{type(module).__name__} is not an embedding or normalisation layer"
    if type(module).forward is not base.forward and module not in VERIFIED:
        return f"{type(module).__name__} overrides forward(); per-example gradients assume {base.__name__}'s own"
    return None


@torch.no_grad()
def verify_forward(module: nn.Module, x: Tensor, out: Tensor) -> bool:
    """Whether ``module`` (a subclass with its own forward) computed its base class's function on ``x``;
    if so it is measured from then on (:data:`VERIFIED`)."""
    try:
        if isinstance(module, nn.Embedding):
            want = F.embedding(x, module.weight, module.padding_idx)
        elif isinstance(module, nn.LayerNorm):
            want = F.layer_norm(x.float(), module.normalized_shape, module.weight.float(),
                                None if module.bias is None else module.bias.float(), module.eps)
        elif isinstance(module, nn.GroupNorm):
            want = F.group_norm(x.float(), module.num_groups, module.weight.float(),
                                None if module.bias is None else module.bias.float(), module.eps)
        else:
            return False
        ok = isinstance(out, Tensor) and out.shape == want.shape and torch.allclose(
            out.float(), want.float(), rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - a layout the base function does not take (e.g. channels-first LN)
        return False
    if ok:
        VERIFIED.add(module)
    return ok


def norm_grad_sq_sum(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
    """``Σ_n (∂ℓ_n/∂W)²`` and ``Σ_n (∂ℓ_n/∂b)²`` (None without a bias) for an embedding or normalisation layer."""
    reason = supports_norm(module)
    if reason is not None:
        raise TypeError(f"norm_grad_sq_sum: {reason}")
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            return _embedding(module, x, g), None
        dtype = torch.promote_types(x.dtype, g.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        x, g = x.detach().to(dtype), g.detach().to(dtype)
        if isinstance(module, nn.LayerNorm):
            return _layer_norm(module, x, g)
        return _group_norm(module, x, g)


def embedding_rows(module: nn.Embedding, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(keys, rows): per (example, token id) present in the batch, ``n·vocab + id`` and the sum of that id's
    output gradients in that example — the row of example n's gradient of the table (padding left out)."""
    vocab, dim = module.weight.shape
    dtype = g.dtype if g.dtype not in (torch.float16, torch.bfloat16) else torch.float32
    n = ids.shape[0] if ids.dim() > 1 else 1
    ids = ids.reshape(n, -1).long()
    rows = g.detach().to(dtype).reshape(n, -1, dim)
    if ids.shape[1] != rows.shape[1]:
        raise ValueError(f"norm_grad_sq_sum: Embedding ids {tuple(ids.shape)} and gradient {tuple(g.shape)} differ")
    keep = ids != module.padding_idx if module.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
    example = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    keys = (example * vocab + ids)[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    return uniq, rows.new_zeros(uniq.numel(), dim).index_add_(0, inverse, rows[keep])   # Σ_t per (n, v)


def _embedding(module: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
    uniq, per_example = embedding_rows(module, ids, g)
    vocab, dim = module.weight.shape
    out = per_example.new_zeros(vocab, dim)
    return out.index_add_(0, uniq % vocab, per_example.square())


def _layer_norm(module: nn.LayerNorm, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
    # x̂ from the layer's own kernel without its affine part: one fused pass, not six small ones (a ViT's
    # LayerNorm at batch 64: 0.23 ms against 1.0 ms)
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    n = x.shape[0] if x.dim() > len(module.normalized_shape) else 1
    shape = (n, -1, *module.normalized_shape)
    w = (g * xhat).reshape(shape).sum(1).square_().sum(0)
    b = g.reshape(shape).sum(1).square_().sum(0) if module.bias is not None else None
    return w, b


def _group_norm(module: nn.GroupNorm, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
    n, c = x.shape[0], x.shape[1]
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps).reshape(n, c, -1)
    gg = g.reshape(n, c, -1)
    w = (gg * xhat).sum(2).square_().sum(0)
    b = gg.sum(2).square_().sum(0) if module.bias is not None else None
    return w, b
