"""Per-layer totals of squared per-example gradient norms, ``Σ_n ‖∂ℓ_n/∂W‖²``, without per-example gradients.

The change rate of a layer (Krähenbühl et al. §3) is ``sqrt(mean(G²_k) / mean(W_k²))``: only the *total*
``Σ_e G²_{k,e} = Σ_n ‖∂ℓ_n/∂W_k‖²`` enters it, not the per-element squares (those are for the cv of
Fig. 1b). The total has a cheaper form. With the layer's per-example gradient ``∂ℓ_n/∂W = A_nᵀ B_n``
(``A_n`` the output gradients, L × O; ``B_n`` the inputs or unfolded input patches, L × K, over the
L positions a weight is shared across — tokens, output pixels):

    ``‖A_nᵀ B_n‖²_F = ⟨A_n A_nᵀ, B_n B_nᵀ⟩``   (two L × L Gram matrices, "ghost norms": Goodfellow 2015,
    Li et al. 2022 §4)

which costs ``L²(O + K)`` per example against ``L·O·K`` for the per-example gradient; for ``L = 1`` it is
``‖a_n‖²‖b_n‖²``. Deep layers of a convolutional network (small maps) and short sequences are where it
wins; elsewhere :func:`grad_norm_sq_sum` sums :func:`ftdoctor.engine.persample.grad_sq_sum`'s per-element
squares (the same total). Embeddings sum their per-(example, token id) rows' squares; normalisation layers'
per-element squares are cheap already.

**Dead positions.** A position whose output gradient is zero in every output (a row of ``A_n`` that is 0)
adds nothing to either form, so on the CPU a linear layer's factors keep only the live positions
(:func:`_live`): padding tokens, whose outputs no real token attends to, and every token but the one a
classifier reads in the last block (BERT's ``[CLS]``, a ViT's class token: there the sum is
``Σ_n ‖a_n‖²‖u_n‖²`` of one position). The sum is the same; the Grams shrink with the square of the
positions kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftdoctor.engine import persample
from ftdoctor.engine.conv_squares import _pad
from ftdoctor.engine.norm_squares import embedding_rows

#: what one chunk of Gram matrices may take (bytes)
_CHUNK_BYTES = 64 * 2**20


class InputGram:
    """The last linear layer input's Gram ``U Uᵀ`` (N, 1, L, L), for the next layer that reads the same
    tensor: a transformer's query, key and value projections read one hidden state, so two of their three
    input Grams are reused (BERT-mini: 4 of 28 matrix products a backward). One entry: the layers that share
    an input are reached one after another by the backward. The entry keeps the input alive, so no other
    tensor can take its address while it is held; an in-place change moves its version counter."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._x: Tensor | None = None
        self._gram: Tensor | None = None

    @staticmethod
    def _key_of(x: Tensor) -> tuple:
        return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version

    def get(self, x: Tensor, kept: int | None = None) -> Tensor | None:
        """The Gram held for ``x`` over its first ``kept`` positions (None: as last put)."""
        if self._x is None or self._key[:-1] != self._key_of(x) or kept not in (None, self._key[-1]):
            return None
        return self._gram

    def put(self, x: Tensor, gram: Tensor, kept: int | None = None) -> None:
        self._key, self._x, self._gram = (*self._key_of(x), kept), x, gram

    def clear(self) -> None:
        self._key = self._x = self._gram = None


def grad_norm_sq_sum(module: nn.Module, x: Tensor, g: Tensor,
                     grams: InputGram | None = None) -> tuple[Tensor, Tensor | None]:
    """``Σ_n ‖∂ℓ_n/∂W‖²`` and ``Σ_n ‖∂ℓ_n/∂b‖²`` (None without a bias) as float64 scalars, from the layer's
    input ``x`` and ``g = ∂(Σ_n ℓ_n)/∂out`` (as :func:`~ftdoctor.engine.persample.grad_sq_sum`, whose
    per-element squares these totals are the sums of). Raises as it does for a module it does not take.
    ``grams``: where a linear layer's input Gram is kept for the next layer reading the same input."""
    reason = persample.supports(module)
    if reason is not None:
        raise TypeError(f"grad_norm_sq_sum: {reason}")
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            return _embedding(module, x, g), None
        conv = isinstance(module, (nn.Conv1d, nn.Conv2d)) and x.dim() == len(module.kernel_size) + 2
        pair = (_linear_factors(module, x, g) if isinstance(module, nn.Linear)
                else _conv_factors(module, x, g) if conv else None)
        if pair is None:        # norm layers; shapes where the per-element squares are cheaper
            w, b = persample.grad_sq_sum(module, x, g)
            return w.sum(dtype=torch.float64), None if b is None else b.sum(dtype=torch.float64)
        a, u, bias_rows, kept = pair
        gram = conv                          # a convolution's factors carry the patch Gram already
        # shared only while the batch's whole Gram fits one chunk (else chunked, formed per layer), and
        # between layers that keep the same leading positions of the input
        if (not conv and grams is not None and kept is not None and a.shape[2] > 1
                and a.shape[0] * a.shape[2] ** 2 * a.element_size() <= _CHUNK_BYTES):
            u, gram = _shared_gram(x, u, grams, kept), True
        w = _ghost_sum(a, u, gram=gram)
        b = (bias_rows.square().sum(dtype=torch.float64) if bias_rows is not None and module.bias is not None
             else None)
        return w, b


def _cheaper(positions: int, out: int, inner: int) -> bool:
    """Whether the two Gram matrices cost less than the per-example gradient (``L(O + K) < O·K``)."""
    return positions * (out + inner) < out * inner


def _linear_factors(module: nn.Linear, x: Tensor,
                    g: Tensor) -> tuple[Tensor, Tensor, Tensor | None, int | None] | None:
    """(A (N, 1, L', O), U (N, 1, L', K), bias rows, the leading positions kept or None) over the live
    positions (:func:`_live`); None where the per-element squares cost less."""
    dtype = persample.computation_dtype(x, g)
    x, g = x.detach().to(dtype), g.detach().to(dtype)
    if x.dim() == 1:
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    n = x.shape[0]
    a = g.reshape(n, -1, module.out_features)     # (N, L, O)
    u = x.reshape(n, -1, module.in_features)      # (N, L, K)
    if a.shape[1] != u.shape[1]:
        return None
    a, u, kept = _live(a, u)
    if not _cheaper(a.shape[1], module.out_features, module.in_features):
        return None
    return a.unsqueeze(1), u.unsqueeze(1), a.sum(1), kept


def _live(a: Tensor, u: Tensor) -> tuple[Tensor, Tensor, int | None]:
    """``a`` (N, L, O) and ``u`` (N, L, K) over the positions whose output gradient is not all zero (module
    doc), and how many leading positions were kept (None: gathered per example, not a leading run).

    When the live positions lie within the first P of every example (padding at the end, a class token
    first), both are cut to those P (views, no copy); when each example has at most half as many live
    positions as that, elsewhere (a classifier reading each example's last real token), they are gathered
    example by example, the live ones first (rows of dead positions filling the rest are zero in ``a``).
    On the CPU only: on a GPU, counting them would wait at every layer for the backward's queued kernels."""
    length = a.shape[1]
    if length == 1 or a.device.type != "cpu":
        return a, u, length
    live = a.abs().amax(-1) != 0                   # (N, L); a NaN counts as live
    somewhere = live.any(0).nonzero()
    last = int(somewhere[-1]) + 1 if len(somewhere) else 1
    most = max(int(live.sum(1).max()), 1)          # live positions of the example with the most
    if 2 * most <= last:
        index = torch.argsort(live.to(torch.uint8), dim=1, descending=True, stable=True)[:, :most].unsqueeze(-1)
        return (a.gather(1, index.expand(-1, -1, a.shape[2])), u.gather(1, index.expand(-1, -1, u.shape[2])),
                None)
    return a[:, :last], u[:, :last], last


def _conv_factors(module: nn.Module, x: Tensor,
                  g: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None] | None:
    """(A, U-Gram, bias rows, None) per group: A (N, G, L, Og) output gradients, ``U Uᵀ`` (N, G, L, L) the Gram of
    the input patches, from the Gram of the (padded) input pixels (:func:`_patch_gram`): no unfolded copy.
    None where the per-element squares cost less."""
    dtype = persample.computation_dtype(x, g)
    x, g = x.detach().to(dtype), g.detach().to(dtype)
    n, groups = x.shape[0], module.groups
    positions = g[0, 0].numel() if g.dim() > 2 else 1
    og, cg = module.out_channels // groups, module.in_channels // groups
    taps = math.prod(module.kernel_size)
    if g.shape[:2] != (n, module.out_channels):
        return None
    x, padding = _pad(module, x)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if len(kernel) == 1:       # Conv1d as a Conv2d of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    pixels = x[0, 0].numel()
    # multiply-adds per example: the pixel Gram and its tap sums, against the per-example gradient
    if pixels * pixels * cg + positions * positions * (taps + og) >= positions * og * cg * taps:
        return None
    out_size = tuple(g.shape[2:])
    if math.prod(out_size) != positions:
        return None
    a = g.reshape(n, groups, og, positions).transpose(2, 3)                       # (N, G, L, Og)
    return a, _patch_gram(x.reshape(n, groups, cg, *x.shape[2:]), kernel, stride, dilation, out_size), \
        g.reshape(n, module.out_channels, -1).sum(2), None


def _patch_gram(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                out_size: tuple[int, int]) -> Tensor:
    """``U Uᵀ`` (N, G, L, L) of the input patches of a padded input ``x`` (N, G, Cg, Hp, Wp).

    Patch ``l`` at output pixel ``(i, j)`` holds the pixels ``(i·s + a·d, j·s + b·d)`` over taps ``(a, b)``,
    so ``⟨U_l, U_l'⟩ = Σ_(a,b) P[(i·s + a·d, j·s + b·d), (i'·s + a·d, j'·s + b·d)]`` with ``P`` the Gram of
    the pixels (Hp·Wp)² over the channels: ``(Hp·Wp)²·Cg + taps·L²`` multiply-adds instead of ``L²·Cg·taps``
    and no unfolded copy of the input."""
    n, groups, cg, hp, wp = x.shape
    flat = x.reshape(n * groups, cg, hp * wp)
    p = torch.bmm(flat.transpose(1, 2), flat).view(n * groups, hp, wp, hp, wp)
    (h, w), (sh, sw) = out_size, stride
    # the tap sum is separable: over the kernel's rows a on both sides first (whole pixel rows, contiguous),
    # then over its columns b — kh + kw slice-adds instead of kh·kw strided ones (resnet18's 3×3 convs on
    # 8×8 maps at a batch of 64: 0.33 ms against 0.92 ms)
    rows_summed = None
    for a in range(kernel[0]):
        r = a * dilation[0]
        rows = slice(r, r + sh * (h - 1) + 1, sh)
        part = p[:, rows, :, rows, :]
        rows_summed = part.clone() if rows_summed is None else rows_summed.add_(part)
    gram = None
    for b in range(kernel[1]):
        c = b * dilation[1]
        cols = slice(c, c + sw * (w - 1) + 1, sw)
        part = rows_summed[:, :, cols, :, cols]
        gram = part.clone() if gram is None else gram.add_(part)
    return gram.reshape(n, groups, h * w, h * w)


def _shared_gram(x: Tensor, u: Tensor, grams: InputGram, kept: int) -> Tensor:
    """``U Uᵀ`` (N, 1, L', L') of a linear layer's input ``u`` (N, 1, L', K), the first ``kept`` positions of
    ``x`` — the one ``grams`` holds when the last layer read the same tensor and kept the same positions,
    else formed and kept."""
    gram = grams.get(x, kept)
    if gram is None or gram.dtype != u.dtype:
        gram = torch.bmm(u.flatten(0, 1), u.flatten(0, 1).transpose(1, 2)).unsqueeze(1)
        grams.put(x, gram, kept)
    return gram


def _ghost_sum(a: Tensor, u: Tensor, gram: bool) -> Tensor:
    """``Σ_n Σ_groups ⟨A Aᵀ, U Uᵀ⟩`` over chunks of examples (float64 total); with ``gram`` ``u`` is already
    ``U Uᵀ`` (N, G, L, L) (:func:`_patch_gram`), else U (N, G, L, K)."""
    n, groups, length = a.shape[:3]
    if length == 1 and not gram:
        return (a.square().sum(-1) * u.square().sum(-1)).sum(dtype=torch.float64)
    step = max(1, _CHUNK_BYTES // max(1, 2 * groups * length * length * a.element_size()))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, n, step):
        aa = a[lo:lo + step].flatten(0, 1)
        uu = u[lo:lo + step].flatten(0, 1)
        ug = uu if gram else torch.bmm(uu, uu.transpose(1, 2))
        total += (torch.bmm(aa, aa.transpose(1, 2)) * ug).sum(dtype=torch.float64)
    return total


def _embedding(module: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
    """Σ over (example, token id) of the squared sum of that id's output gradients in that example."""
    _, rows = embedding_rows(module, ids, g)
    return rows.square().sum(dtype=torch.float64)
