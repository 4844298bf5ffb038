"""Activation R² against the pretrained model — L2-SP (Li et al. 2018), §4.4 and Fig. 4.

For the output of every matched affine layer (the head excluded) and every
channel, pooled over examples and positions, the fine-tuned activation ``a``
is compared with the reference's ``b``:

* ``r2`` — squared Pearson correlation, the coefficient of determination of
  the least-squares line (L2-SP's "linear dependence": insensitive to a unit
  that was merely rescaled);
* ``r2_identity`` — ``1 − Σ(a − b)² / Σ(b − mean b)²`` (no fit).

Streaming float64 sums Σa, Σb, Σa², Σb², Σab per channel: O(channels) memory.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ftdoctor.probes.base import Batch, Finding, Probe, ProbeContext, ProbeResult, register_probe
from ftdoctor.thresholds import Thresholds


def channel_rows(out: Tensor, kind: str) -> Tensor:
    """(rows, channels): channel is dim 1 of conv outputs, the last dim of linear outputs."""
    if kind.startswith("Conv"):
        c = out.shape[1]
        return out.transpose(0, 1).reshape(c, -1).T
    return out.reshape(-1, out.shape[-1])


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


@register_probe
class R2Probe(Probe):
    name = "r2"
    description = "L2-SP: per-channel R² of activations against the pretrained model (Fig. 4)"
    needs_reference = True
    needs = frozenset({"outputs"})

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.pairs = [(m, r) for m, r in ctx.reference_layers if m.name != ctx.head.name]
        for mine, _ in self.pairs:
            c = mine.weight.shape[0]
            k = self._key(mine.name)
            self.add_state(k + "n", torch.zeros((), dtype=torch.float64))
            for s in ("sa", "sb", "saa", "sbb", "sab"):
                self.add_state(k + s, torch.zeros(c, dtype=torch.float64))

    @staticmethod
    def _key(name: str) -> str:
        return "r2__" + name.replace(".", "__") + "__"

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        for mine, _ in self.pairs:
            a_out = batch.outputs.get(mine.name)
            b_out = batch.ref_outputs.get(mine.name)
            if a_out is None or b_out is None or a_out.shape != b_out.shape:
                continue
            k = self._key(mine.name)
            a = channel_rows(a_out, mine.kind).to(torch.float64)
            b = channel_rows(b_out, mine.kind).to(torch.float64)
            getattr(self, k + "n").add_(a.shape[0])
            getattr(self, k + "sa").add_(a.sum(0))
            getattr(self, k + "sb").add_(b.sum(0))
            getattr(self, k + "saa").add_((a * a).sum(0))
            getattr(self, k + "sbb").add_((b * b).sum(0))
            getattr(self, k + "sab").add_((a * b).sum(0))

    def compute(self) -> ProbeResult:
        rows, arrays = [], {}
        for mine, _ in self.pairs:
            k = self._key(mine.name)
            n = float(getattr(self, k + "n"))
            if n == 0:
                self.skip(mine.name, "its output never matched the reference's in shape")
                continue
            sums = [getattr(self, k + s).cpu().numpy() for s in ("sa", "sb", "saa", "sbb", "sab")]
            r2, ident, constant = r2_from_sums(n, *sums)
            live = ~constant
            arrays[f"{mine.name}/r2"] = r2
            arrays[f"{mine.name}/r2_identity"] = ident
            if not live.any():
                rows.append({"name": mine.name, "channels": 0, "median": None, "q1": None, "q3": None,
                             "min": None, "mean": None, "identity_median": None,
                             "constant_channels": int(constant.sum())})
                continue
            v = r2[live]
            rows.append({"name": mine.name, "channels": int(live.sum()),
                         "median": float(np.median(v)), "q1": float(np.percentile(v, 25)),
                         "q3": float(np.percentile(v, 75)), "min": float(v.min()), "mean": float(v.mean()),
                         "identity_median": float(np.median(ident[live])),
                         "constant_channels": int(constant.sum())})
        return ProbeResult(figures={"layers": rows}, arrays=arrays)

    def findings(self, result: ProbeResult, thresholds: Thresholds) -> list[Finding]:
        rows = [r for r in result.figures["layers"] if r["median"] is not None]
        if not rows:
            return []
        deep = rows[-1]
        if deep["median"] < thresholds.min_r2_median:
            return [Finding(self.name, "warning",
                            f"deepest matched layer {deep['name']} keeps a median R² of {deep['median']:.2f} "
                            f"against the pretrained model: its features were largely overwritten (L2-SP Fig. 4)",
                            "fine-tune with an L2-SP penalty: ftdoctor trace MODEL --method l2sp "
                            "(or ftdoctor.dynamics.L2SP in your loop)")]
        return []
