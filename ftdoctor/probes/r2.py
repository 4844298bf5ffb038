"""Activation R² against the pretrained model — L2-SP (Li et al. 2018), §4.4 and Fig. 4.

For the output of every matched affine layer (the head excluded) and every
channel, pooled over examples and positions (the real tokens of a text, not its padding: :class:`RealTokens`),
the fine-tuned activation ``a``
is compared with the reference's ``b``:

* ``r2`` — squared Pearson correlation, the coefficient of determination of
  the least-squares line (L2-SP's "linear dependence": insensitive to a unit
  that was merely rescaled);
* ``r2_identity`` — ``1 − Σ(a − b)² / Σ(b − mean b)²`` (no fit).

Streaming float64 sums Σa, Σb, Σa², Σb², Σab per channel: O(channels) memory
(accumulated on values shifted by the first batch's channel means and unshifted
once at the end, :func:`shifted_sums`, :func:`unshift`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ftdoctor.model import AffineLayer
from ftdoctor.numbers import fmt
from ftdoctor.probes.base import Batch, Column, Figures, Probe, ProbeContext, ProbeResult, register_probe, row_json
from ftdoctor.probes.verdicts import Suggestion, Verdict, bound
from ftdoctor.thresholds import Thresholds


def channel_dims(out: Tensor, kind: str) -> tuple[int, list[int]]:
    """The channel dim (1 for conv outputs, the last for linear ones) and the dims pooled over."""
    channel = 1 if kind.startswith("Conv") and out.dim() > 1 else out.dim() - 1
    return channel, [d for d in range(out.dim()) if d != channel]


def token_mask(inputs: Any) -> Tensor | None:
    """The ``attention_mask`` (B, T) of token inputs as booleans, None for images."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


class RealTokens:
    """Each layer's (B, T, C) output of one batch over tokens without its padded positions, (N, C): padding
    contributes nothing to the R² (no mask, or an output of another shape: as it is). The real positions are
    found once per batch, each output gathered by one ``index_select`` (a boolean index searches the mask anew
    for every layer, twice per layer pair: BERT-mini's 12 pairs, 1.3 → 0.3 ms a measuring step)."""

    def __init__(self, mask: Tensor | None) -> None:
        self.shape = tuple(mask.shape) if mask is not None else None
        self._mask = mask
        self._rows: dict[torch.device, Tensor] = {}

    def __call__(self, out: Tensor) -> Tensor:
        if self.shape is None or out.dim() != 3 or tuple(out.shape[:2]) != self.shape:
            return out
        rows = self._rows.get(out.device)
        if rows is None:
            rows = self._rows[out.device] = self._mask.to(out.device).reshape(-1).nonzero().squeeze(1)
        return out.reshape(-1, out.shape[2]).index_select(0, rows)


def _layout(out: Tensor, kind: str) -> tuple[int, int, int]:
    """(rows before the channel dim, channels, positions after it) of a layer's output."""
    channel, _ = channel_dims(out, kind)
    return math.prod(out.shape[:channel]), out.shape[channel], math.prod(out.shape[channel + 1:])


# Outputs with at least this many positions per (example, channel) — conv maps of 8×8 and up —
# are reduced by batched dot products, the rest stacked per shape (:func:`shifted_sums`)...
_GRAM_MIN_POSITIONS = 64
# ...through a work buffer of at most this size, a chunk of examples at a time.
_GRAM_CHUNK_BYTES = 32 * 2**20
# Smaller maps and linear outputs of at least this many elements are reduced pair by pair; smaller ones
# (resnet18's late maps) are stacked, as their per-layer operations cost more in dispatch than in arithmetic.
_STACK_MAX_ELEMENTS = 2**16


def shifted_sums(pairs: list[tuple[Tensor, Tensor, Tensor, Tensor]], kind: str) -> list[Tensor]:
    """Per pair ``(a, b, shift_a, shift_b)`` of one batch, the per-channel
    ``[Σa', Σb', Σa'², Σb'², Σa'b']`` (5, C) with ``a' = a − shift_a``, ``b' = b − shift_b``.

    Every ``a`` and ``b`` must share one shape and ``kind`` (their layers' outputs). Sums are taken
    in the activations' own precision (float32 at least) on values shifted by a per-channel
    constant near the mean: float32 sums then keep ~1e-7 of the variance, where sums of raw
    squares would lose it whenever a channel's mean dwarfs its spread, and no float64 copy of the
    activations is made. :func:`unshift` turns the accumulated sums into raw ones, in float64.

    Three ways, by map size (measured, two threads, a batch of 64):

    * large maps — ``a'`` and ``b'`` side by side per (example, channel), their 2×2 Gram matrices
      by one batched matrix product, added over examples in float64: four passes over the
      activations instead of about twenty (VGG-style at 32×32: 17 → 10 ms a batch, in isolation);
    * large outputs of small maps or linear layers (a ViT's tokens) — pair by pair, a few
      elementwise passes each: stacking them first would copy every activation (a 4-block ViT-tiny's
      16 token outputs: 35 → 18 ms a batch, in isolation);
    * small ones — the pairs stacked and reduced together, a handful of tensor operations for all of
      them: per-layer operations on resnet18's small late maps cost more in dispatch than in
      arithmetic (resnet18 at 32×32: 14 → 9 ms a batch, in isolation).
    """
    lead, c, positions = _layout(pairs[0][0], kind)
    if positions >= _GRAM_MIN_POSITIONS:
        return [_gram_sums(a, b, sa, sb, lead, c, positions) for a, b, sa, sb in pairs]
    if pairs[0][0].numel() >= _STACK_MAX_ELEMENTS:
        return [_pair_sums(a, b, sa, sb, lead, c) for a, b, sa, sb in pairs]
    # stacks of at most _GRAM_CHUNK_BYTES (a ViT's token outputs are large and many of one shape)
    per_pair = 2 * pairs[0][0].numel() * pairs[0][2].element_size()
    step = max(1, _GRAM_CHUNK_BYTES // max(1, per_pair))
    if len(pairs) > step:
        return [s for i in range(0, len(pairs), step) for s in shifted_sums(pairs[i:i + step], kind)]
    work = pairs[0][2].dtype
    k = len(pairs)
    # (2k, rows before the channel, C, rows after): the a's, then the b's
    x = torch.stack([a.to(work) for a, *_ in pairs] + [b.to(work) for _, b, *_ in pairs]).view(2 * k, lead, c, -1)
    x.sub_(torch.stack([sa for *_, sa, _ in pairs] + [sb for *_, sb in pairs]).view(2 * k, 1, c, 1))
    first = x.sum((1, 3))
    second = x.square().sum((1, 3))
    cross = (x[:k] * x[k:]).sum((1, 3))
    return [torch.stack([first[i], first[k + i], second[i], second[k + i], cross[i]]) for i in range(k)]


def _pair_sums(a: Tensor, b: Tensor, shift_a: Tensor, shift_b: Tensor, lead: int, c: int) -> Tensor:
    """:func:`shifted_sums` of one pair, by elementwise passes over it."""
    positions = a.numel() // (lead * c)
    # (rows, C) when the channel is last: a reduction over (0, 2) with a trailing 1 is several times slower
    shape, per_channel, dims = ((lead, c), (c,), 0) if positions == 1 else ((lead, c, positions), (1, c, 1), (0, 2))
    x = a.reshape(shape).to(shift_a.dtype) - shift_a.view(per_channel)    # new tensors: squared in place
    y = b.reshape(shape).to(shift_b.dtype) - shift_b.view(per_channel)
    cross = (x * y).sum(dims)
    return torch.stack([x.sum(dims), y.sum(dims), x.square_().sum(dims), y.square_().sum(dims), cross])


def _gram_sums(a: Tensor, b: Tensor, shift_a: Tensor, shift_b: Tensor, lead: int, c: int, q: int) -> Tensor:
    """:func:`shifted_sums` of one pair through per-(example, channel) Gram matrices of ``[a'; b']``."""
    a, b = a.reshape(lead, c, q), b.reshape(lead, c, q)
    step = max(1, min(lead, _GRAM_CHUNK_BYTES // (2 * c * q * shift_a.element_size())))
    work = torch.empty(step, c, 2, q, dtype=shift_a.dtype, device=a.device)
    first = torch.zeros(c, 2, dtype=torch.float64, device=a.device)
    gram = torch.zeros(c, 2, 2, dtype=torch.float64, device=a.device)
    for lo in range(0, lead, step):
        m = min(step, lead - lo)
        x = work[:m]
        torch.sub(a[lo:lo + m], shift_a.view(1, c, 1), out=x[:, :, 0])
        torch.sub(b[lo:lo + m], shift_b.view(1, c, 1), out=x[:, :, 1])
        first += x.sum((0, 3))
        flat = x.view(m * c, 2, q)
        gram += torch.bmm(flat, flat.transpose(1, 2)).view(m, c, 2, 2).sum(0, dtype=torch.float64)
    return torch.stack([first[:, 0], first[:, 1], gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1]])


def unshift(n: Tensor | float, sums: Tensor, shift_a: Tensor, shift_b: Tensor) -> Tensor:
    """Raw ``[Σa, Σb, Σa², Σb², Σab]`` (float64) from sums of values shifted by exactly ``shift_a/b``."""
    sa, sb, saa, sbb, sab = sums.double()
    ha, hb = shift_a.double(), shift_b.double()
    return torch.stack([sa + n * ha, sb + n * hb, saa + 2 * ha * sa + n * ha * ha,
                        sbb + 2 * hb * sb + n * hb * hb, sab + ha * sb + hb * sa + n * ha * hb])


def r2_from_sums(n: float, sa: np.ndarray, sb: np.ndarray, saa: np.ndarray, sbb: np.ndarray,
                 sab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r2, r2_identity, constant mask) per channel from the streaming sums."""
    var_b = sbb - sb * sb / n          # Σ(b − mean b)²
    var_a = saa - sa * sa / n
    cov = sab - sa * sb / n
    constant = var_b <= 1e-12 * np.maximum(sbb, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(var_a > 0, cov * cov / (var_a * var_b), 0.0)
        r2 = np.clip(r2, 0.0, 1.0)
        ident = 1.0 - (saa - 2.0 * sab + sbb) / var_b
    r2[constant] = np.nan
    ident[constant] = np.nan
    return r2, ident, constant


def _per_channel(counts: list[Tensor], widths: list[int]) -> Tensor:
    """Each layer's count repeated over its channels: the layers' sums side by side share one ``n``."""
    return torch.cat([c.reshape(1).expand(w) for c, w in zip(counts, widths)])


def quantiles(rows: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """(len(qs), rows) quantiles of each row of a 2-D array, interpolated linearly between the sorted
    values at ``q·(n − 1)`` (``np.percentile``'s default method; the 0.5 one is the median): one sort
    for every row, no per-call overhead of ``np.percentile`` (~0.1 ms a layer, a layer's R² at every
    measuring step of the live monitor)."""
    s = np.sort(rows, axis=1)
    n = s.shape[1]
    out = np.empty((len(qs), s.shape[0]))
    for i, q in enumerate(qs):
        h = q * (n - 1)
        lo = int(math.floor(h))
        hi = min(lo + 1, n - 1)
        t = h - lo
        a, b = s[:, lo], s[:, hi]
        out[i] = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
    return out


@dataclass(frozen=True)
class LayerR2:
    """One box of Fig. 4: the distribution over a layer's channels of R² against the reference."""

    name: str
    channels: int                    # channels with reference variance (the others are constant_channels)
    median: float | None
    q1: float | None
    q3: float | None
    min: float | None
    mean: float | None
    identity_median: float | None    # median of 1 − Σ(a − b)²/Σ(b − mean b)²
    constant_channels: int


@dataclass(frozen=True)
class R2Figures(Figures):
    layers: tuple[LayerR2, ...]

    def to_json(self) -> dict[str, Any]:
        return {"layers": [row_json(r) for r in self.layers]}


@register_probe(name="r2", description="L2-SP: per-channel R² of activations against the pretrained model (Fig. 4)",
                needs_reference=True, needs=frozenset({"outputs"}), priority=40)
class R2Probe(Probe):

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.pairs = [(m, r) for m, r in ctx.reference_layers if m.name != ctx.head.name]
        self._by_name = {m.name: m for m, _ in self.pairs}
        self.shifts: dict[str, tuple[Tensor, Tensor]] = {}   # per layer: channel means of its first batch
        for mine, _ in self.pairs:
            c = mine.weight.shape[0]
            k = self._key(mine.name)
            dev = mine.weight.device
            self.add_state(k + "n", torch.zeros((), dtype=torch.float64, device=dev))
            # Σa, Σb, Σa², Σb², Σab: shifted sums during the pass, raw ones after _unshift()
            self.add_state(k + "sums", torch.zeros(5, c, dtype=torch.float64, device=dev))
        self._raw = False

    @staticmethod
    def _key(name: str) -> str:
        return "r2__" + name.replace(".", "__") + "__"

    def _shifts(self, layer: AffineLayer, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if layer.name not in self.shifts:    # this process's first batch: its channel means
            _, dims = channel_dims(a, layer.kind)
            work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
            self.shifts[layer.name] = (a.to(work).mean(dims), b.to(work).mean(dims))
        return self.shifts[layer.name]

    @torch.no_grad()
    def take_pair(self, name: str, a: Tensor, b: Tensor) -> bool:
        """Reduce one layer's pair as the reference's forward produces ``b``, if it is a large map.

        The engine calls this from the reference's forward hook, with this batch's model output ``a``
        and the reference's own output ``b`` before any later in-place op; True means consumed — no
        copy of ``b`` is kept for :meth:`update` (which reduces the small maps, together). When the
        reference's forward overlaps the backward passes (engine), so does this work.
        """
        layer = self._by_name.get(name)
        if layer is None or a.shape != b.shape or a.numel() == 0:
            return False
        lead, c, positions = _layout(a, layer.kind)
        if positions < _GRAM_MIN_POSITIONS:
            return False
        shift_a, shift_b = self._shifts(layer, a, b)
        k = self._key(name)
        getattr(self, k + "n").add_(lead * positions)
        getattr(self, k + "sums").add_(_gram_sums(a, b, shift_a, shift_b, lead, c, positions))
        return True

    @torch.no_grad()
    def unavailable(self) -> str | None:
        if self.ctx.scripted:
            return ("a TorchScript model runs no Python forward hooks, so its layers' activations cannot be "
                    "compared with the reference's; probe the eager checkpoint (state dict with --arch)")
        return None

    def update(self, batch: Batch) -> None:
        groups: dict[tuple, list[tuple[AffineLayer, tuple[Tensor, Tensor, Tensor, Tensor]]]] = {}
        real = RealTokens(token_mask(batch.x))
        for mine, _ in self.pairs:
            a = batch.outputs.get(mine.name)
            b = batch.ref_outputs.get(mine.name)     # absent when take_pair() consumed it
            if a is None or b is None or a.shape != b.shape or a.numel() == 0:
                continue
            a, b = real(a), real(b)
            shift_a, shift_b = self._shifts(mine, a, b)
            key = (tuple(a.shape), channel_dims(a, mine.kind)[0], shift_a.dtype)
            groups.setdefault(key, []).append((mine, (a, b, shift_a, shift_b)))
        for members in groups.values():
            kind = members[0][0].kind
            lead, _, positions = _layout(members[0][1][0], kind)
            rows = lead * positions
            for (mine, _), sums in zip(members, shifted_sums([m for _, m in members], kind)):
                k = self._key(mine.name)
                getattr(self, k + "n").add_(rows)
                getattr(self, k + "sums").add_(sums)

    def _unshift(self) -> None:
        """Shifted sums → raw float64 sums, once (before the cross-process sum: shifts differ per process)."""
        if self._raw:
            return
        keys = [(self._key(m.name), m.name) for m, _ in self.pairs if m.name in self.shifts]
        if keys:
            # every layer at once (the same float64 operations per channel as one layer at a time)
            sums = [getattr(self, k + "sums") for k, _ in keys]
            widths = [t.shape[1] for t in sums]
            n = _per_channel([getattr(self, k + "n") for k, _ in keys], widths)
            raw = unshift(n, torch.cat(sums, dim=1), torch.cat([self.shifts[name][0].reshape(-1) for _, name in keys]),
                          torch.cat([self.shifts[name][1].reshape(-1) for _, name in keys]))
            for (k, _), part in zip(keys, raw.split(widths, dim=1)):
                setattr(self, k + "sums", part)
        self._raw = True

    def reduce_(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        self._unshift()
        super().reduce_(all_reduce)

    def merge_(self, other: Probe) -> None:
        self._unshift()
        other._unshift()   # type: ignore[attr-defined]  # each process shifted by its own means
        super().merge_(other)

    def compute(self) -> ProbeResult:
        self._unshift()
        rows, arrays = [], {}
        seen = []
        for mine, _ in self.pairs:
            k = self._key(mine.name)
            if float(getattr(self, k + "n")) == 0:
                self.skip(mine.name, "its output never matched the reference's in shape")
            else:
                seen.append((mine.name, getattr(self, k + "n"), getattr(self, k + "sums")))
        if not seen:
            return ProbeResult(figures=R2Figures(()), arrays=arrays)
        # every layer's channels in one float64 array (one copy off the device, one r2_from_sums)
        widths = [sums.shape[1] for _, _, sums in seen]
        n = _per_channel([count for _, count, _ in seen], widths)
        table = torch.cat([n.to(torch.float64).unsqueeze(0), torch.cat([s for *_, s in seen], dim=1)]).cpu().numpy()
        r2_all, ident_all, constant_all = r2_from_sums(table[0], *table[1:])
        edges = np.cumsum([0, *widths])
        for (name, _, _), lo, hi in zip(seen, edges[:-1], edges[1:]):
            r2, ident, constant = r2_all[lo:hi], ident_all[lo:hi], constant_all[lo:hi]
            live = ~constant
            arrays[f"{name}/r2"] = r2
            arrays[f"{name}/r2_identity"] = ident
            if not live.any():
                rows.append(LayerR2(name, 0, None, None, None, None, None, None, int(constant.sum())))
                continue
            v = r2[live]
            (q25, _), (med, ident_med), (q75, _) = quantiles(np.stack([v, ident[live]]), (0.25, 0.5, 0.75))
            rows.append(LayerR2(name, int(live.sum()), float(med), float(q25), float(q75),
                                float(v.min()), float(v.mean()), float(ident_med), int(constant.sum())))
        return ProbeResult(figures=R2Figures(tuple(rows)), arrays=arrays)

    thresholds = ("min_r2_median",)
    columns = (Column("R² median", "median"), Column("R²≈id", "identity_median"))

    @classmethod
    def judge(cls, figures: Figures, t: Thresholds) -> list[Verdict]:
        """The worst matched layer's median R² (the deepest is in the summary)."""
        if t.min_r2_median is None:
            return []
        rows = [r for r in figures["layers"] if r.get("median") is not None]
        worst = min(rows, key=lambda r: r["median"]) if rows else None
        return [bound("min_r2_median", worst["median"] if worst else None, t.min_r2_median,
                      "lowest per-layer median R² against the reference",
                      where=f" ({worst['name']})" if worst else " (no layer matched the reference)",
                      explanation="the pretrained features were largely overwritten (L2-SP Fig. 4)",
                      suggestion=Suggestion("trace", ("--method", "l2sp"), before="fine-tune with an L2-SP penalty: ",
                                            after=" (or ftdoctor.train.L2SP in your loop)"))]

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        meds = [l["median"] for l in figures["layers"] if l.get("median") is not None]
        return [("R² median, deepest layer (L2-SP)", fmt(meds[-1]))] if meds else []
