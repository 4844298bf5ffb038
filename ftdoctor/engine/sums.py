"""Float64 running sums the probes accumulate in, cheap to feed from float32 per-batch tensors.

The engine may add a layer's per-example squares straight into a probe's sum
(:meth:`Float64Sum.sink`), so no per-batch tensor is filled and added.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor


class Float64Sum:
    """A float64 running sum of same-shaped tensors, added at their own precision in blocks.

    The probes' sums stay float64, but converting every float32 addend to float64 first costs a
    float64 copy of it per batch — for resnet18's 11M weights, a third of a training step
    (measured, ``benchmarks/overhead.py``). Instead each float32 (or half) addend goes into a float32
    partial sum, folded into the float64 total every ``block`` adds and before any read: the
    partial's rounding stays within ``block``·2⁻²⁴ of the addends (1e-6 relative for 16 non-negative
    addends), far below the 1e-5 the figures are checked at, while the total of many batches is
    still accumulated in float64. float64 addends go straight into the total.
    """

    def __init__(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None,
                 block: int = 16) -> None:
        self.shape, self.device, self.block = torch.Size(shape), device, block
        self._total: Tensor | None = None      # allocated by the first fold (no zero-filled pass)
        self._partial: Tensor | None = None
        self._pending = 0

    def _target(self, like: Tensor) -> Tensor:
        # laid out like the first addend (zeros_like keeps the strides of a permuted tensor), so a
        # producer can add straight into it in its own layout (:meth:`sink`)
        if like.dtype == torch.float64:
            if self._total is None:
                self._total = torch.zeros_like(like, dtype=torch.float64, device=self.device)
            return self._total
        if self._partial is None:
            self._partial = torch.zeros_like(like, dtype=torch.float32, device=self.device)
        return self._partial

    def sink(self, dtype: torch.dtype) -> Tensor | None:
        """The tensor an addend of ``dtype`` goes into, for a producer to add into in place
        (then call :meth:`added_in_place_`); ``None`` until a first :meth:`add_` has set its layout."""
        return self._total if dtype == torch.float64 else self._partial if dtype == torch.float32 else None

    def added_in_place_(self, target: Tensor) -> "Float64Sum":
        """Count an addend a producer added into :meth:`sink`'s tensor itself."""
        if target is not self._partial and target is not self._total:
            raise ValueError("not this sum's tensor")
        self._added(target)
        return self

    def _added(self, target: Tensor) -> None:
        if target is self._partial:
            self._pending += 1
            if self._pending >= self.block:
                self.flush_()

    def add_(self, t: Tensor) -> "Float64Sum":
        """``+= t``."""
        target = self._target(t)
        target.add_(t)
        self._added(target)
        return self

    def add_square_(self, t: Tensor) -> "Float64Sum":
        """``+= t²`` (elementwise)."""
        target = self._target(t)
        target.addcmul_(t, t)
        self._added(target)
        return self

    def flush_(self) -> None:
        """Fold the float32 partial sum into the float64 total."""
        if self._partial is not None and self._pending:
            if self._total is None:
                self._total = self._partial.to(torch.float64)
            else:
                self._total.add_(self._partial)
            self._partial.zero_()
        self._pending = 0

    def value(self) -> Tensor:
        """The float64 sum of everything added so far (in the first addend's layout)."""
        self.flush_()
        if self._total is None:
            self._total = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        return self._total


def sum_of_squares(t: Tensor, row: int = 4096) -> float:
    """``Σ t²`` as a Python float, accurate to ~1e-7 relative for float32 ``t``, without a float64 copy.

    Dot products of ``row``-element rows in the tensor's precision (short sums: small rounding),
    added in float64. ``torch.linalg.vector_norm`` of a large float32 tensor drifts by 1e-4
    relative (measured on 2.4M elements), and asking it for float64 copies the tensor first.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.float64 or flat.numel() <= row:
        d = flat.double()
        return float(torch.dot(d, d))
    flat = flat.float()  # half precision: bmm in float32
    k = flat.numel() // row
    rows = flat[: k * row].view(k, 1, row)
    total = torch.bmm(rows, rows.transpose(1, 2)).sum(dtype=torch.float64)
    rest = flat[k * row:]
    return float(total) + float(torch.dot(rest.double(), rest.double()))



#: id → (tensor, (its version counter, its storage's address) then, Σ t²): the norms :func:`remembered_norms` keeps
Norms = dict[int, tuple[Tensor, tuple[int, int], float]]

_REMEMBERED: Norms | None = None
_CARRIED: Norms = {}


@contextlib.contextmanager
def remembered_norms(carry: Norms | None = None) -> Iterator[Norms]:
    """Within the block, :func:`weight_sum_of_squares` computes each tensor's norm once: the change rates,
    the gradient norms' ratios and drift read the same weights at a measuring step, and nothing may change
    a weight inside the block.

    ``carry``: the dict an earlier block yielded. Its norms are reused for the tensors that require no
    gradient and whose version counter and storage have not moved since (an in-place change such as a
    ``load_state_dict`` moves the counter): the live monitor's frozen reference, which drift divides by at
    every measuring step. A tensor that requires a gradient is never carried: a fused optimizer's step
    (``AdamW(fused=True)``, Hugging Face Trainer's default) changes it without moving its counter. The
    yielded dict holds the norms this block used, to carry into the next."""
    global _REMEMBERED, _CARRIED
    if _REMEMBERED is not None:          # nested: the outer block's
        yield _REMEMBERED
        return
    _REMEMBERED, _CARRIED = {}, carry or {}
    try:
        yield _REMEMBERED
    finally:
        _REMEMBERED, _CARRIED = None, {}


def tensor_stamp(t: Tensor) -> tuple[int, int]:
    """What moves when a tensor's values may have changed: its version counter (any in-place op) and its
    storage's address (``p.data = …`` moves the address, not the counter). A fused optimizer's step moves
    neither: only a tensor that requires no gradient can be trusted unchanged by its stamp."""
    return t._version, t.data_ptr()


def weight_sum_of_squares(t: Tensor) -> float:
    """:func:`sum_of_squares` of a weight, computed once inside :func:`remembered_norms`."""
    if _REMEMBERED is None:
        return sum_of_squares(t)
    key, stamp = id(t), tensor_stamp(t)
    hit = _REMEMBERED.get(key)
    if hit is None and not t.requires_grad:
        hit = _CARRIED.get(key)
    if hit is None or hit[0] is not t or hit[1] != stamp:
        hit = (t, stamp, sum_of_squares(t))     # t kept: its id is not reused while the entry lives
    _REMEMBERED[key] = hit
    return hit[2]


def distance_sum_of_squares(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> float:
    """``Σ (a − b)²`` as :func:`sum_of_squares` of the difference, formed ``chunk`` elements at a time in
    one reused buffer (no model-sized temporary: drift reads every weight at every measuring step)."""
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    fa, fb = a.detach().reshape(-1), b.detach().to(a.device).reshape(-1)
    if fa.numel() <= chunk:
        return sum_of_squares(fa.to(work) - fb.to(work))
    buf = torch.empty(chunk, dtype=work, device=a.device)
    total = 0.0
    for lo in range(0, fa.numel(), chunk):
        hi = min(lo + chunk, fa.numel())
        part = buf[:hi - lo]
        torch.sub(fa[lo:hi], fb[lo:hi], out=part)
        total += sum_of_squares(part)
    return total
