"""Weight drift from the pretrained model — L2-SP's Ω (Li et al. 2018, eq. 3), data-free.

Per affine layer with a counterpart of equal shape in the reference:
``abs`` = ‖W − W⁰‖_F and ``rel`` = abs / ‖W⁰‖_F. ``sp_penalty`` = Σ_k ‖W_k − W⁰_k‖²
over the matched kernel weights — the L2-SP penalty before the factor α/2.
Layers without an equal-shaped counterpart (a new head) are listed as ``new``.
"""
from __future__ import annotations

import math

import torch

from ftdoctor.engine.sums import sum_of_squares
from ftdoctor.probes.base import Batch, Finding, Probe, ProbeResult, finite_or_none, register_probe
from ftdoctor.thresholds import Thresholds


def drift_figures(layers, reference_modules: dict) -> dict:
    """‖W − W⁰‖ per layer and their squared sum, in the weights' precision (float32 at least) with
    float64 sums (:func:`sum_of_squares`): no float64 copy of the model."""
    rows, new, penalty = [], [], 0.0
    for layer in layers:
        ref = reference_modules.get(layer.name)
        w = layer.weight.detach()
        w0 = getattr(ref, "weight", None)
        if not isinstance(w0, torch.Tensor) or tuple(w0.shape) != tuple(w.shape):
            new.append(layer.name)
            continue
        work = torch.promote_types(torch.promote_types(w.dtype, w0.dtype), torch.float32)
        w0 = w0.detach().to(w.device, work)
        sq = sum_of_squares(w.to(work) - w0)
        base = math.sqrt(sum_of_squares(w0))
        penalty += sq
        rows.append({"name": layer.name, "abs": finite_or_none(math.sqrt(sq)),
                     "rel": finite_or_none(math.sqrt(sq) / base) if base > 0 else None})
    return {"sp_penalty": finite_or_none(penalty), "layers": rows, "new": new}


@register_probe
class DriftProbe(Probe):
    name = "drift"
    description = "L2-SP: weight distance from the pretrained model (data-free)"
    needs_reference = True
    needs_data = False

    def update(self, batch: Batch) -> None:
        return None

    def compute(self) -> ProbeResult:
        ref = self.ctx.reference
        modules = dict(ref.named_modules()) if ref is not None else {}
        return ProbeResult(figures=drift_figures(self.ctx.layers, modules))

    def findings(self, result: ProbeResult, thresholds: Thresholds) -> list[Finding]:
        moved = [r for r in result.figures["layers"] if r["rel"] is not None and r["rel"] > thresholds.max_drift_rel]
        if not moved:
            return []
        names = ", ".join(f"{r['name']} ({r['rel']:.2f})" for r in moved[:5])
        return [Finding(self.name, "warning",
                        f"{len(moved)} layer(s) moved more than {thresholds.max_drift_rel:g} of their pretrained "
                        f"norm: {names}",
                        "regularise towards the pretrained weights: ftdoctor trace MODEL --method l2sp")]
