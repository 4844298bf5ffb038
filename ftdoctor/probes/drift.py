"""Weight drift from the pretrained model — L2-SP's Ω (Li et al. 2018, eq. 3), data-free.

Per affine layer with a counterpart of equal shape in the reference:
``abs`` = ‖W − W⁰‖_F and ``rel`` = abs / ‖W⁰‖_F. ``sp_penalty`` = Σ_k ‖W_k − W⁰_k‖²
over the matched kernel weights — the L2-SP penalty before the factor α/2.
Layers without an equal-shaped counterpart (a new head) are listed as ``new``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ftdoctor.engine.sums import distance_sum_of_squares, weight_sum_of_squares
from ftdoctor.numbers import fmt
from ftdoctor.probes.base import Batch, Column, Figures, Probe, ProbeResult, finite_or_none, register_probe, row_json
from ftdoctor.probes.verdicts import Suggestion, Verdict, bound
from ftdoctor.thresholds import Thresholds


@dataclass(frozen=True)
class LayerDrift:
    name: str
    abs: float | None                 # ‖W − W⁰‖_F
    rel: float | None                 # abs / ‖W⁰‖_F


@dataclass(frozen=True)
class DriftFigures(Figures):
    sp_penalty: float | None          # Σ_k ‖W_k − W⁰_k‖² (L2-SP's Ω before α/2)
    layers: tuple[LayerDrift, ...]
    new: tuple[str, ...]              # layers without an equal-shaped counterpart (a new head)

    def to_json(self) -> dict[str, Any]:
        return {"sp_penalty": self.sp_penalty, "layers": [row_json(r) for r in self.layers], "new": list(self.new)}


def drift_figures(layers, reference_modules: dict) -> DriftFigures:
    """‖W − W⁰‖ per layer and their squared sum, in the weights' precision (float32 at least) with
    float64 sums (:func:`~ftdoctor.engine.sums.distance_sum_of_squares`): no copy of the model."""
    rows, new, penalty = [], [], 0.0
    for layer in layers:
        ref = reference_modules.get(layer.name)
        w = layer.weight.detach()
        w0 = getattr(ref, "weight", None)
        if not isinstance(w0, torch.Tensor) or tuple(w0.shape) != tuple(w.shape):
            new.append(layer.name)
            continue
        sq = distance_sum_of_squares(w, w0)
        base = math.sqrt(weight_sum_of_squares(w0))
        penalty += sq
        rows.append(LayerDrift(layer.name, finite_or_none(math.sqrt(sq)),
                               finite_or_none(math.sqrt(sq) / base) if base > 0 else None))
    return DriftFigures(finite_or_none(penalty), tuple(rows), tuple(new))


@register_probe(name="drift", description="L2-SP: weight distance from the pretrained model (data-free)",
                needs_reference=True, needs_data=False, priority=50)
class DriftProbe(Probe):

    def update(self, batch: Batch) -> None:
        return None

    def compute(self) -> ProbeResult:
        ref = self.ctx.reference
        modules = dict(ref.named_modules()) if ref is not None else {}
        return ProbeResult(figures=drift_figures(self.ctx.layers, modules))

    thresholds = ("max_drift_rel",)
    columns = (Column("drift rel", "rel"),)

    @classmethod
    def judge(cls, figures: Figures, t: Thresholds) -> list[Verdict]:
        """The layer that moved most, relative to its pretrained norm (L2-SP's Ω per layer)."""
        if t.max_drift_rel is None:
            return []
        rows = [r for r in figures["layers"] if r.get("rel") is not None]
        if not rows:
            return [Verdict("max_drift_rel", False, None, t.max_drift_rel,
                            "no affine layer matches the reference by name and shape: is --reference the "
                            "pretrained model of this architecture?")]
        worst = max(rows, key=lambda r: r["rel"])
        moved = [r for r in rows if r["rel"] > t.max_drift_rel]
        return [bound("max_drift_rel", worst["rel"], t.max_drift_rel, "largest relative weight drift",
                      where=f" ({worst['name']})",
                      explanation="regularise towards the pretrained weights"
                                  + (f"; {len(moved)} layers moved more than that" if len(moved) > 1 else ""),
                      suggestion=Suggestion("trace", ("--method", "l2sp")))]

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        new = figures.get("new")
        return [("L2-SP penalty Σ‖W−W⁰‖²",
                 fmt(figures.get("sp_penalty")) + (f"  (new: {', '.join(new)})" if new else ""))]
