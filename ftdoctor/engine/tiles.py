"""The matrix-product kernels behind the per-example squares: chunking, the pair expansion, the
in-cache batched products, and the cost model that picks one per layer (:mod:`.persample`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# ``bmm`` is memory-bound for small L: its per-example gradients are squared
# while still in cache, so a chunk's output aims at this size per thread
# (resnet18's layers at batch 64, two threads: 4 MB in all 87 ms, 8 MB 78 ms)...
_CACHE_BYTES = 4 * 2**20

# ...with at least this many examples per chunk (unless max_chunk_bytes says fewer).
_MIN_CHUNK = 8


def _added(out: Tensor | None, w2: Tensor) -> Tensor:
    """``w2``, or ``out += w2`` (returning ``out``) when there is a running sum."""
    return w2 if out is None else out.add_(w2)


def _per_chunk(n: int, bytes_per_example: int, max_chunk_bytes: int) -> int:
    return max(1, min(n, max_chunk_bytes // max(1, bytes_per_example)))


def _chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


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
