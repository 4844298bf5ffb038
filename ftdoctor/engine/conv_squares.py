"""Per-example squares of convolutions: per kernel tap over the output positions where it sees the input
(``pairs``), on the unfolded input (``bmm``), or as one grouped convolution's weight gradient (``conv``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftdoctor.engine.tiles import _added, _bmm_chunked, _choose, _chunks, _pairs_into, _per_chunk, _Scratch

if TYPE_CHECKING:
    from ftdoctor.engine.persample import Method

_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


@dataclass(frozen=True)
class _Geometry:
    """A convolution's kernel, stride, symmetric zero padding, dilation and output size."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    out_size: tuple[int, ...]


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
