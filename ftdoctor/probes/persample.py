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
under ``max_chunk_bytes``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Method", "computation_dtype", "grad_sq_sum", "supports"]

Method = Literal["auto", "pairs", "bmm", "conv"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
# ``bmm`` is memory-bound for small L: its per-example gradients are squared
# while still in cache, so a chunk's output aims at this size per thread
# (resnet18's layers at batch 64, two threads: 4 MB in all 87 ms, 8 MB 78 ms)...
_CACHE_BYTES = 4 * 2**20
# ...with at least this many examples per chunk (unless max_chunk_bytes says fewer).
_MIN_CHUNK = 8


def supports(module: nn.Module) -> str | None:
    """``None`` if :func:`grad_sq_sum` handles ``module``, else the reason it does not."""
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


def grad_sq_sum(
    module: nn.Module,
    x: Tensor,
    g: Tensor,
    *,
    max_chunk_bytes: int = 256 * 2**20,
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
    if method not in ("auto", "pairs", "bmm", "conv"):
        raise ValueError(f"grad_sq_sum: unknown method {method!r}")
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


def _added(out: Tensor | None, w2: Tensor) -> Tensor:
    """``w2``, or ``out += w2`` (returning ``out``) when there is a running sum."""
    return w2 if out is None else out.add_(w2)


# ------------------------------------------------------------------ helpers


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


def _per_chunk(n: int, bytes_per_example: int, max_chunk_bytes: int) -> int:
    return max(1, min(n, max_chunk_bytes // max(1, bytes_per_example)))


def _chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


@dataclass(frozen=True)
class _Geometry:
    """A convolution's kernel, stride, symmetric zero padding, dilation and output size."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    out_size: tuple[int, ...]


# ------------------------------------------------------------------- Linear


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


# --------------------------------------------------------------------- Conv


def _conv(
    module: nn.Module, x: Tensor, g: Tensor, max_chunk_bytes: int, method: Method, out: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    if x.dim() != nd + 2 or x.shape[1] != module.in_channels:
        raise ValueError(f"grad_sq_sum: {type(module).__name__} got input {tuple(x.shape)}")
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    x, padding = _pad(module, x)
    out_size = tuple(
        (s + 2 * p - dl * (k - 1) - 1) // st + 1
        for s, k, st, dl, p in zip(x.shape[2:], kernel, stride, dilation, padding)
    )
    n, c = x.shape[:2]
    o, groups = module.out_channels, module.groups
    if tuple(g.shape) != (n, o, *out_size):
        raise ValueError(
            f"grad_sq_sum: {type(module).__name__} with input {tuple(x.shape)} gives output {(n, o, *out_size)}, "
            f"got output gradient {tuple(g.shape)}"
        )
    og, cg = o // groups, c // groups
    geo = _Geometry(kernel, stride, padding, dilation, out_size)
    taps = _tap_boxes(tuple(x.shape[2:]), geo)
    if method == "auto":
        method = _choose(math.prod(out_size), og, cg, taps=[_box_size(box) for box in taps], conv_ok=True,
                         groups=groups)
    if method == "pairs":
        into = _tap_major(out, groups, len(taps))
        w2 = _conv_pairs(x, g, geo, taps, groups, max_chunk_bytes, into).reshape(module.weight.shape)
        w2 = out if into is not None else _added(out, w2)
    else:
        w2 = _conv_dense(x, g, geo, taps, tuple(module.weight.shape), groups, method, max_chunk_bytes, out)
    bias = g.reshape(n, o, -1).sum(2).square().sum(0) if module.bias is not None else None
    return w2, bias


def _tap_major(out: Tensor | None, groups: int, taps: int) -> Tensor | None:
    """``out`` (O, Cg, k…) as the (taps, G, Og, Cg) tensor ``pairs`` accumulates into, if its
    memory is laid out that way (else ``None``)."""
    if out is None:
        return None
    o, cg = out.shape[:2]
    try:
        view = out.view(o, cg, taps).permute(2, 0, 1)
    except RuntimeError:   # the kernel dims are not merged in memory
        return None
    if not view.is_contiguous():
        return None
    return view.view(taps, groups, o // groups, cg)


def _pad(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Pad ``x`` as the layer's forward does; return the padding left to the kernels.

    Symmetric zero padding is left to the kernels (which skip it); the rest —
    'same' with an even kernel, reflect/replicate/circular modes — is applied
    here, exactly as ``nn.Conv*d`` does before its padding-free convolution.
    """
    nd = len(module.kernel_size)
    if module.padding == "valid":
        pads = [(0, 0)] * nd
    elif module.padding == "same":  # the odd element goes to the end, as in nn.Conv*d
        totals = [dl * (k - 1) for k, dl in zip(module.kernel_size, module.dilation)]
        pads = [(total // 2, total - total // 2) for total in totals]
    else:
        pads = [(p, p) for p in module.padding]
    if module.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return x, tuple(lo for lo, _ in pads)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad takes the last dim first
    if any(flat):
        x = F.pad(x, flat, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x, (0,) * nd


def _tap_boxes(size: tuple[int, ...], geo: _Geometry) -> list[tuple[range, ...]]:
    """Per kernel tap (row-major, as in the weight), the output positions where it sees the input.

    Along each dim, tap ``j`` reads input ``o·s + j·d − p`` at output ``o``:
    the ``o`` keeping that inside ``[0, size)`` form a range, so the positions
    are a box (empty when the tap only ever sees padding).
    """
    per_dim = []
    for s, k, st, dl, p, out in zip(size, geo.kernel, geo.stride, geo.dilation, geo.padding, geo.out_size):
        ranges = []
        for j in range(k):
            first = max(0, -((j * dl - p) // st))
            last = (s - 1 - j * dl + p) // st if s - 1 - j * dl + p >= 0 else -1
            ranges.append(range(first, max(first, min(out, last + 1))))
        per_dim.append(ranges)
    boxes: list[tuple[range, ...]] = [()]
    for ranges in per_dim:
        boxes = [box + (r,) for box in boxes for r in ranges]
    return boxes


def _box_size(box: tuple[range, ...]) -> int:
    return math.prod(len(r) for r in box)


def _conv_pairs(
    x: Tensor, g: Tensor, geo: _Geometry, taps: list[tuple[range, ...]], groups: int, max_chunk_bytes: int,
    into: Tensor | None = None,
) -> Tensor:
    """``pairs`` per kernel tap, over the output positions where the tap sees the input → (G, Og, Cg, K);
    added into ``into`` (K, G, Og, Cg), unclamped, when given."""
    n, c = x.shape[:2]
    o = g.shape[1]
    og, cg = o // groups, c // groups
    widest = max(_box_size(box) for box in taps)
    per_example = (widest * (widest + 1) + 2 * widest) * (og + cg) * groups * x.element_size()
    step = _per_chunk(n, per_example, max_chunk_bytes)
    # each tap's first product overwrites: no zero-fill pass (or all add into the running sum)
    out = into if into is not None else x.new_empty(len(taps), groups, og, cg)
    scratch = _Scratch()
    offsets = [_unravel(t, geo.kernel) for t in range(len(taps))]
    for lo, hi in _chunks(n, step):
        m = hi - lo
        for t, box in enumerate(taps):
            count = _box_size(box)
            if count == 0:  # the tap only ever sees padding: its gradient is 0
                if lo == 0 and into is None:
                    out[t].zero_()
                continue
            g_box = g[(slice(lo, hi), slice(None), *(slice(r.start, r.stop) for r in box))]
            x_box = x[
                (slice(lo, hi), slice(None))
                + tuple(
                    slice(r.start * st + j * dl - p, (r.stop - 1) * st + j * dl - p + 1, st)
                    for r, j, st, dl, p in zip(box, offsets[t], geo.stride, geo.dilation, geo.padding)
                )
            ]
            a = g_box.reshape(m, groups, og, count).permute(1, 0, 3, 2)  # (G, m, L_t, Og)
            b = x_box.reshape(m, groups, cg, count).permute(1, 0, 3, 2)  # (G, m, L_t, Cg)
            _pairs_into(out[t], a, b, scratch, accumulate=lo > 0 or into is not None)
    if into is None:
        out.clamp_(min=0)
    return out.permute(1, 2, 3, 0)


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(index % s)
        index //= s
    return tuple(reversed(out))


def _conv_dense(
    x: Tensor, g: Tensor, geo: _Geometry, taps: list[tuple[range, ...]], weight_shape: tuple[int, ...],
    groups: int, method: str, max_chunk_bytes: int, out: Tensor | None = None,
) -> Tensor:
    """``bmm`` (on unfolded patches) or ``conv``, over the taps that see the input at all (added into
    ``out`` when given)."""
    x, geo, live = _drop_dead_taps(x, geo, taps)
    into = out if live is None else None   # a running sum the kernel can add into directly
    n, c = x.shape[:2]
    o = g.shape[1]
    og, cg = o // groups, c // groups
    reduced_shape = (o, cg, *geo.kernel)
    if method == "conv":
        w2 = _conv_trick(x, g, geo, reduced_shape, groups, max_chunk_bytes, into)
    else:
        if any(geo.padding):  # once for the batch, so each chunk's patches are a plain copy
            x = F.pad(x, [p for p in reversed(geo.padding) for _ in range(2)])
            geo = _Geometry(geo.kernel, geo.stride, (0,) * len(geo.kernel), geo.dilation, geo.out_size)
        L, kg = math.prod(geo.out_size), cg * math.prod(geo.kernel)
        scratch = _Scratch()

        def operands(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            u = scratch.get("patches", x, hi - lo, c * math.prod(geo.kernel), L)
            _unfold_into(u, x[lo:hi], geo)
            b = u.view(hi - lo, groups, kg, L).transpose(2, 3)  # (m, G, L, Kg)
            a = g[lo:hi].reshape(hi - lo, groups, og, L).transpose(2, 3)  # (m, G, L, Og)
            return a, b

        item = x.element_size()
        acc = into.view(groups, o // groups, kg) if into is not None and into.is_contiguous() else None
        w2 = _bmm_chunked(operands, n, o * kg * item, c * math.prod(geo.kernel) * L * item, max_chunk_bytes, scratch,
                          acc)
        w2 = w2.reshape(reduced_shape)
        if acc is None and into is not None:
            into.add_(w2)
    if into is not None:   # added in place
        return into
    if live is None:
        return w2
    if out is not None:
        out[(slice(None), slice(None), *live)] += w2
        return out
    full = w2.new_zeros(weight_shape)
    full[(slice(None), slice(None), *live)] = w2
    return full


def _drop_dead_taps(
    x: Tensor, geo: _Geometry, taps: list[tuple[range, ...]]
) -> tuple[Tensor, _Geometry, tuple[slice, ...] | None]:
    """Crop the kernel to the taps that see the input somewhere (the others have gradient 0).

    Small maps in ImageNet networks (resnet's layer4 at 32×32 input is 1×1
    under a padded 3×3 kernel) would otherwise spend most of the work on
    zeros.  Returns the input cropped/padded for the smaller kernel (no
    padding left), its geometry, and the live tap slices (``None``: all live).
    """
    spatial = len(geo.kernel)
    live = []
    for dim in range(spatial):  # tap j along `dim` is live if some tap using it has a non-empty box
        js = {_unravel(t, geo.kernel)[dim] for t, box in enumerate(taps) if all(len(r) for r in box)}
        live.append((min(js), max(js) + 1) if js else (0, 1))
    if all(hi - lo == k for (lo, hi), k in zip(live, geo.kernel)):
        return x, geo, None
    flat: list[int] = []
    for (lo, hi), size, st, dl, p, out in zip(live, x.shape[2:], geo.stride, geo.dilation, geo.padding, geo.out_size):
        before = p - lo * dl  # negative crops
        after = (out - 1) * st + (hi - lo - 1) * dl + 1 - size - before
        flat = [before, after] + flat  # F.pad takes the last dim first
    kernel = tuple(hi - lo for lo, hi in live)
    reduced = _Geometry(kernel, geo.stride, (0,) * spatial, geo.dilation, geo.out_size)
    return F.pad(x, flat), reduced, tuple(slice(lo, hi) for lo, hi in live)


def _unfold_into(out: Tensor, x: Tensor, geo: _Geometry) -> None:
    """Copy the patches of ``x`` (geometry without padding) into ``out`` (N, C·prod(kernel), L).

    Rows are in the weight's (C, k…) order.
    """
    n, c = x.shape[:2]
    strides = x.stride()
    patches = x.as_strided(
        (n, c, *geo.kernel, *geo.out_size),
        (
            strides[0],
            strides[1],
            *(dl * s for dl, s in zip(geo.dilation, strides[2:])),
            *(st * s for st, s in zip(geo.stride, strides[2:])),
        ),
        x.storage_offset(),
    )
    out.view(patches.shape).copy_(patches)


def _conv_trick(
    x: Tensor, g: Tensor, geo: _Geometry, weight_shape: tuple[int, ...], groups: int, max_chunk_bytes: int,
    acc: Tensor | None = None,
) -> Tensor:
    """Per-example gradients as the weight gradient of one (N·G)-group convolution (added into ``acc``)."""
    n, c, *size = x.shape
    o = weight_shape[0]
    weight_grad = _CONV_WEIGHT_GRAD[len(size)]
    per_example = (math.prod(weight_shape) + c * math.prod(size) + g[0].numel()) * x.element_size()
    if acc is None:
        acc = x.new_zeros(weight_shape)
    for lo, hi in _chunks(n, _per_chunk(n, per_example, max_chunk_bytes)):
        m = hi - lo
        per = weight_grad(
            x[lo:hi].reshape(1, m * c, *size), (m * o, *weight_shape[1:]), g[lo:hi].reshape(1, m * o, *g.shape[2:]),
            stride=geo.stride, padding=geo.padding, dilation=geo.dilation, groups=m * groups,
        )
        acc += per.view(m, *weight_shape).square_().sum(0)
    return acc


# ------------------------------------------------------ Σ_n (A_nᵀ B_n)² kernels


def _choose(L: int, og: int, cg: int, *, taps: list[int], conv_ok: bool, groups: int = 1) -> str:
    """The cheapest kernel for a layer with L output positions and per-group Og × Cg·K weights.

    ``taps`` lists, per kernel tap, how many output positions see the input.
    Costs per example, in multiply-adds of a large matrix product: ``pairs``
    does ``Σ_t L_t(L_t+1)/2 · Og·Cg`` plus building the products; ``bmm`` does
    ``L·Og·Cg`` per tap but then writes, squares and sums every per-example
    gradient (~24 such units per element, in cache).  The ``conv`` trick
    (grouped convolution; oneDNN on CPU) wins for grouped and depthwise
    convolutions and for moderate per-group weights on large maps, but not
    when each group's unfolded row is short (RGB input under a 3×3 kernel:
    Cg·K = 27) nor for 1×1 kernels, where ``bmm`` is one long matrix product
    per example.  Measured (CPU ms, torch 2.14, batch 64 unless noted;
    1 = one thread, 2 = two)::

        layer (input map)                    pairs    bmm    conv   picked
        resnet18 conv1 3→64 7×7/2 (32×32)       —     7.9    9.0    conv  (1; 2: 5.6 / 5.6)
        resnet18 64→64 3×3 (8×8)              288     7.3    9.6    bmm   (1)
        resnet18 128→128 3×3 (4×4)             35     9.3     76    bmm   (1)
        resnet18 256→256 3×3 (2×2)            4.1      20    288    pairs (1)
        resnet18 512→512 3×3 (1×1)            1.0     8.4     86    pairs (1)
        64→64 3×3 (16×16)                       —      23     17    conv  (1)
        32→32 3×3 (32×32)                       —      49     12    conv  (2)
        3→16 3×3 (32×32)                        —     2.7     18    bmm   (2)
        8→16 3×3 (32×32)                        —     4.6    2.9    conv  (2)
        128→128 3×3 (16×16)                     —      88    119    bmm   (1)
        vgg11 512→512 3×3 (4×4)               277     131   1201    bmm   (1)
        depthwise 96 3×3 (16×16)                —      38    3.9    conv  (2)
        1×1 64→256 (56×56), batch 16            —      19     50    bmm   (2)
        3→64 7×7/2 (224×224), batch 16          —     106     68    conv  (2)
    """
    k = len(taps)
    size = og * cg * k
    if (conv_ok and k > 1 and (groups > 1 or cg * k > 32)
            and (size <= 4096 and L >= 9 or size <= 65536 and L >= 128)):
        return "conv"
    pairs = sum(t * (t + 1) // 2 for t in taps) * (og * cg + 8 * (og + cg))
    dense = k * (og * cg * (L + 24) + 8 * cg * L)
    return "pairs" if pairs <= dense else "bmm"


def _bmm_chunked(
    operands: Callable[[int, int], tuple[Tensor, Tensor]], n: int, out_bytes: int, operand_bytes: int,
    max_chunk_bytes: int, scratch: _Scratch, acc: Tensor | None = None,
) -> Tensor:
    """Σ_n (a_nᵀ b_n)² with ``operands(lo, hi)`` → a (m, G, L, O), b (m, G, L, K) for examples lo..hi
    (added into ``acc`` (G, O, K) when given).

    ``out_bytes`` is one example's gradient.  Each product is squared while in
    cache: a chunk of examples is split along O so a tile stays near
    ``_CACHE_BYTES`` (out of cache this kernel runs several times slower).
    """
    step = _per_chunk(n, out_bytes + operand_bytes, max_chunk_bytes)
    cache = _CACHE_BYTES * max(1, torch.get_num_threads())
    step = min(step, max(_MIN_CHUNK, cache // max(1, out_bytes)))
    for lo, hi in _chunks(n, step):
        a, b = operands(lo, hi)
        m, groups, _, o = a.shape
        k = b.shape[-1]
        rows = max(1, min(o, cache * o // max(1, out_bytes * m)))
        if acc is None:
            acc = a.new_zeros(groups, o, k)
        at = a.transpose(2, 3)
        for r0, r1 in _chunks(o, rows):
            tile = scratch.get("tile", a, m, groups, r1 - r0, k)
            torch.matmul(at[:, :, r0:r1], b, out=tile)  # per-example gradients (m, G, rows, K)
            acc[:, r0:r1] += tile.square_().sum(0)
    assert acc is not None
    return acc


class _Scratch:
    """Work buffers reused across the chunks and taps of one call (fresh large
    allocations page-fault on every use)."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor, *shape: int) -> Tensor:
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self.buffers[name] = like.new_empty(size)
        return buf[:size].view(shape)


def _pairs_into(out: Tensor, a: Tensor, b: Tensor, scratch: _Scratch, accumulate: bool = True) -> None:
    """``out += Σ_n (a_nᵀ b_n)²`` for a (G, n, L, O), b (G, n, L, K), out (G, O, K), via position pairs
    (``out =`` with ``accumulate=False``).

    The result may carry tiny negative rounding residues; the caller clamps
    the final sum at 0.
    """
    groups, n, L, o = a.shape
    k = b.shape[-1]
    p = L * (L + 1) // 2
    pa, pb = scratch.get("pa", a, groups, n, p, o), scratch.get("pb", b, groups, n, p, k)
    start = 0
    for l in range(L):  # the pairs (l, l' ≥ l): L slices per call, not a loop over examples
        m = L - l
        torch.mul(a[:, :, l : l + 1], a[:, :, l:], out=pa[:, :, start : start + m])
        torch.mul(b[:, :, l : l + 1], b[:, :, l:], out=pb[:, :, start : start + m])
        pa[:, :, start + 1 : start + m] *= 2  # off-diagonal pairs appear twice in the square
        start += m
    lhs, rhs = pa.view(groups, n * p, o).transpose(1, 2), pb.view(groups, n * p, k)
    if accumulate:
        out.baddbmm_(lhs, rhs)
    else:
        torch.bmm(lhs, rhs, out=out)
