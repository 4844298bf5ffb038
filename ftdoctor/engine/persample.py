"""Sums of squared per-example gradients of one affine layer, batched.

The core of the ``change_rate`` probe (Krähenbühl et al. §3, SPEC §1.2): for a
layer with weight ``W`` and bias ``b`` it returns ``Σ_n (∂ℓ_n/∂W)²`` and
``Σ_n (∂ℓ_n/∂b)²`` from what the engine's hooks captured in one backward pass:
the layer's input ``x`` and ``g = ∂(Σ_n ℓ_n)/∂out``.  In ``eval()`` mode
example ``n``'s loss depends on example ``n`` alone, so its gradient is built
from ``x_n`` and ``g_n`` only:

* Linear, input ``(N, …, F)``: ``∂ℓ_n/∂W = Σ_t g_{n,t}ᵀ x_{n,t}``, summed over
  every middle position ``t`` (tokens, or ConvNeXt's channels-last pixels).
* Conv with ``G`` groups: ``∂ℓ_n/∂W[o, i, k] = Σ_l g_n[o, l] · x_n[i, l·s + k·d − p]``
  within each group (the unfolded input patches ``U_n`` of example ``n``).

Every case is ``Σ_n (A_nᵀ B_n)²`` with ``A_n`` (L × O) and ``B_n`` (L × K) per
group, and there is no Python loop over examples.  Three kernels compute it;
:func:`_choose` picks one per shape:

``pairs``
    ``Σ_n (A_nᵀB_n)² = Σ_n Σ_{l≤l'} c_{ll'} (A_{nl}∘A_{nl'})ᵀ (B_{nl}∘B_{nl'})``
    (``c`` = 1 on the diagonal, 2 off it): one matrix product with inner size
    ``N·L(L+1)/2`` and no per-example gradient at all.  For ``L = 1`` (2-D
    Linear input, 1×1 maps) it is the closed form ``(g²)ᵀ(x²)``.  Convolutions
    apply it per kernel tap over only the output positions where that tap sees
    the input rather than padding — on the small maps of ImageNet networks at
    CIFAR resolution this skips most of the work.
``bmm``
    per-example gradients of a chunk of examples by one batched matmul (on the
    unfolded input for convolutions), squared in place while still in cache
    and summed.
``conv``
    per-example gradients of a convolution as the weight gradient of one
    grouped convolution with ``N·G`` groups (batch folded into channels,
    :func:`torch.nn.grad.conv2d_weight`).  No unfolded copy of the input; best
    for large maps with small per-group weights (first layers, depthwise).

Batches are processed in chunks so that what is materialised per chunk stays
under ``max_chunk_bytes`` (default :func:`chunk_budget`: 256 MB on the CPU, a quarter of the free memory
of a GPU, at most 2 GB).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ftdoctor.engine.conv_squares import _conv
from ftdoctor.engine.norm_squares import NORM_TYPES, norm_grad_sq_sum, supports_norm
from ftdoctor.engine.tiles import _added, _bmm_chunked, _choose, _chunks, _pairs_into, _per_chunk, _Scratch

__all__ = ["Method", "computation_dtype", "grad_sq_sum", "supports"]

Method = Literal["auto", "pairs", "bmm", "conv"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def supports(module: nn.Module) -> str | None:
    """``None`` if :func:`grad_sq_sum` handles ``module``, else the reason it does not."""
    if isinstance(module, NORM_TYPES):
        return supports_norm(module)
    if isinstance(module, _TRANSPOSED) or getattr(module, "transposed", False):
        return "ConvTranspose not supported"
    if isinstance(module, _CONVS):
        if module.padding_mode not in _PADDING_MODES:
            return f"padding_mode={module.padding_mode!r} not supported"
    elif isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} not supported (only Conv1d/2d/3d)"
    elif not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an affine layer (nn.Linear or nn.Conv1d/2d/3d)"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return "weight is not initialised (lazy module before its first forward)"
    base = nn.Linear if isinstance(module, nn.Linear) else next(cls for cls in _CONVS if isinstance(module, cls))
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            # e.g. weight standardisation or fake quantisation: the gradient of the
            # parameter is no longer g·xᵀ
            return f"{type(module).__name__} overrides {method}(); per-example gradients assume {base.__name__}'s own"
    return None


#: what one chunk of per-example work may materialise on the CPU, and at most on a GPU
CPU_CHUNK_BYTES, MAX_CHUNK_BYTES = 256 * 2**20, 2 * 2**30


def chunk_budget(device: torch.device) -> int:
    """Bytes a chunk of per-example work may take on ``device``: the CPU's fixed budget, or a quarter of what
    a CUDA device has free now (at most 2 GB, at least 32 MB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(MAX_CHUNK_BYTES, max(free // 4, 32 * 2**20)))
    return CPU_CHUNK_BYTES


def grad_sq_sum(
    module: nn.Module,
    x: Tensor,
    g: Tensor,
    *,
    max_chunk_bytes: int | None = None,
    method: Method = "auto",
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``Σ_n (∂ℓ_n/∂W)²`` and ``Σ_n (∂ℓ_n/∂b)²`` for one affine layer.

    ``x`` is the layer's input and ``g`` the gradient of ``Σ_n ℓ_n`` with
    respect to its output, both batched along dim 0 (an unbatched pair counts
    as one example).  Returns a tensor shaped like ``module.weight`` and one
    shaped like ``module.bias`` (``None`` without a bias), in the dtype of
    ``x``/``g`` — float16/bfloat16 are computed and returned in float32.  The
    caller accumulates across batches (in float64).

    ``out`` (shaped like the weight, in the computation's dtype): add the
    weight's sum into it and return it instead of a new tensor — a running
    sum across batches without a per-batch tensor to fill, add and free.  Its
    layout is the caller's; the ``pairs`` kernel adds in place into a
    tap-major one (``out`` laid out like the tensor this function returns
    for that layer, e.g. from ``torch.zeros_like`` of a first result).  Sums
    added this way are not clamped at 0: clamp the total.

    ``max_chunk_bytes`` bounds what is materialised per chunk of examples (at
    least one example is processed at a time).  ``method`` forces a kernel
    (``"pairs"``, ``"bmm"``, or ``"conv"`` for convolutions); ``"auto"`` picks
    the fastest for the shape.

    Raises ``TypeError`` for a module :func:`supports` rejects and
    ``ValueError`` when ``x``/``g`` do not fit the module.
    """
    reason = supports(module)
    if reason is not None:
        raise TypeError(f"grad_sq_sum: {reason}")
    if isinstance(module, NORM_TYPES):          # embeddings and normalisation layers: norm_squares
        w, b = norm_grad_sq_sum(module, x, g)
        if out is not None:
            return out.add_(w.to(out.dtype)), b
        return w, b
    if method not in ("auto", "pairs", "bmm", "conv"):
        raise ValueError(f"grad_sq_sum: unknown method {method!r}")
    if max_chunk_bytes is None:
        max_chunk_bytes = chunk_budget(x.device)
    with torch.no_grad():
        x, g = _common_dtype(x.detach(), g.detach())
        if out is not None and (out.shape != module.weight.shape or out.dtype != x.dtype):
            raise ValueError(f"grad_sq_sum: out must be {x.dtype} shaped {tuple(module.weight.shape)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        if x.shape[0] == 0 and g.shape[0] == 0 and x.dim() > 1:  # an empty batch (a shard's last one)
            bias = module.bias
            return (x.new_zeros(module.weight.shape) if out is None else out,
                    None if bias is None else x.new_zeros(bias.shape))
        if isinstance(module, nn.Linear):
            return _linear(module, x, g, max_chunk_bytes, method, out)
        return _conv(module, x, g, max_chunk_bytes, method, out)


def computation_dtype(x: Tensor, g: Tensor) -> torch.dtype:
    """The dtype :func:`grad_sq_sum` computes and returns in for these inputs (its ``out``'s)."""
    dtype = torch.promote_types(x.dtype, g.dtype)
    if dtype in (torch.float16, torch.bfloat16):  # sums of many squares: overflow, lost digits
        dtype = torch.float32
    return dtype


def _common_dtype(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    dtype = computation_dtype(x, g)
    if not dtype.is_floating_point:
        raise TypeError(f"grad_sq_sum: floating-point inputs needed, got {x.dtype} and {g.dtype}")
    return x.to(dtype), g.to(dtype)


def _linear(
    module: nn.Linear, x: Tensor, g: Tensor, max_chunk_bytes: int, method: Method, out: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    f_in, f_out = module.in_features, module.out_features
    if x.dim() == 1:
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    if x.shape[-1] != f_in or g.shape[-1] != f_out or x.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"grad_sq_sum: Linear({f_in}, {f_out}) got input {tuple(x.shape)} and output gradient {tuple(g.shape)}"
        )
    if method == "conv":
        raise ValueError("grad_sq_sum: method 'conv' is for convolutions only")
    n = x.shape[0]
    a = g.reshape(n, 1, -1, f_out)  # (N, G=1, L, O): L = every middle position
    b = x.reshape(n, 1, -1, f_in)
    L = a.shape[2]
    if method == "auto":
        method = _choose(L, f_out, f_in, taps=[L], conv_ok=False)
    item = x.element_size()
    into = out.view(1, f_out, f_in) if out is not None and out.is_contiguous() else None
    if method == "pairs":
        p = L * (L + 1) // 2
        step = _per_chunk(n, 2 * p * (f_in + f_out) * item, max_chunk_bytes)
        w2 = into if into is not None else x.new_zeros(1, f_out, f_in)
        scratch = _Scratch()
        for lo, hi in _chunks(n, step):
            _pairs_into(w2, a[lo:hi].transpose(0, 1), b[lo:hi].transpose(0, 1), scratch)
        if into is None:
            w2.clamp_(min=0)
    else:
        w2 = _bmm_chunked(lambda lo, hi: (a[lo:hi], b[lo:hi]), n, f_out * f_in * item, 0, max_chunk_bytes,
                          _Scratch(), into)
    bias = g.reshape(n, -1, f_out).sum(1).square().sum(0) if module.bias is not None else None
    return (out if into is not None else _added(out, w2[0])), bias
