"""Per-layer gradient norms of the cross-entropy — RIFLE (Li et al. 2020), §4.6.1 and Fig. 2.

RIFLE's observation: when fine-tuning, the gradients that reach the lower
layers are orders of magnitude smaller than at the head, so the backbone
barely moves ("depth_ratio" = first layer's gradient norm / the head's). For
each affine layer, over batches b with loss L_b = mean cross-entropy:

* ``grad_norm`` = mean_b ‖∇_W L_b‖_F; ``full_grad_norm`` = ‖mean_b ∇_W L_b‖_F
* ``weight_norm`` = ‖W‖_F; ``relative`` = grad_norm / weight_norm
* ``to_head`` = grad_norm / the head's grad_norm; ``bias_grad_norm`` likewise for b
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ftdoctor.engine.norm_squares import role
from ftdoctor.engine.sums import Float64Sum, sum_of_squares, weight_sum_of_squares
from ftdoctor.numbers import fmt
from ftdoctor.probes.base import (Batch, Column, Figures, Finding, Probe, ProbeContext, ProbeResult, finite_or_none,
                                  register_probe, row_json)
from ftdoctor.probes.head import ORDINARY, HeadWatch, is_max_entropy, left_out
from ftdoctor.probes.verdicts import Suggestion, Verdict, bound, rescale_suggestion, rescale_unavailable
from ftdoctor.thresholds import Thresholds


@dataclass(frozen=True)
class LayerGradNorm:
    """One layer of Fig. 2: how large its cross-entropy gradient is, alone and against its weight and the head."""

    name: str
    kind: str
    grad_norm: float | None           # mean over batches of ‖∇_W L_b‖
    full_grad_norm: float | None      # ‖mean over batches of ∇_W L_b‖
    weight_norm: float | None
    relative: float | None
    bias_grad_norm: float | None
    to_head: float | None
    role: str = "affine"              # affine | embedding | norm (norms are not the depth ratio's first layer)


@dataclass(frozen=True)
class GradNormFigures(Figures):
    depth_ratio: float | None         # first layer's grad_norm / the head's
    layers: tuple[LayerGradNorm, ...]
    head: str = ""
    head_kind: str = ORDINARY         # ordinary | max-entropy | feature-normalised max-entropy (probes.head)
    backbone_depth_ratio: float | None = None   # first layer's grad_norm / the deepest layer below the head's
    backbone_top: str | None = None   # that deepest layer below the head
    rescale_unavailable: str | None = None  # why fix --method rescale cannot help this model (None: it can)

    def to_json(self) -> dict[str, Any]:
        return {"depth_ratio": self.depth_ratio, "head": self.head, "head_kind": self.head_kind,
                "backbone_depth_ratio": self.backbone_depth_ratio, "backbone_top": self.backbone_top,
                "rescale_unavailable": self.rescale_unavailable, "layers": [row_json(r) for r in self.layers]}


@register_probe(name="grad_norm", description="RIFLE: per-layer gradient Frobenius norms of the cross-entropy (Fig. 2)",
                needs=frozenset({"ce_grads"}), priority=30)
class GradNormProbe(HeadWatch, Probe):
    measures_norms = True

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.watch_head()
        self.layers = list(ctx.measured_layers)
        self.norms_only = False
        # every state is built from the all-reduced batch gradient: identical on every process
        self.add_state("batches", torch.zeros((), dtype=torch.float64), "replicated")
        for layer in self.layers:
            k = self._key(layer.name)
            dev = layer.weight.device
            self.add_state(k + "norm", torch.zeros((), dtype=torch.float64, device=dev), "replicated")
            self.add_state(k + "sum", Float64Sum(layer.weight.shape, dev), "replicated")
            self.add_state(k + "per_batch", [], reduce="cat")
            if layer.bias is not None:
                self.add_state(k + "bnorm", torch.zeros((), dtype=torch.float64, device=dev), "replicated")

    @staticmethod
    def _key(name: str) -> str:
        return "gn__" + name.replace(".", "__") + "__"

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        self.see_logits(batch)
        for layer in self.layers:
            k = self._key(layer.name)
            if layer.name in batch.ce_grads:
                gw, gb = batch.ce_grads[layer.name]
                sq, bsq = sum_of_squares(gw), (sum_of_squares(gb) if gb is not None else None)
                getattr(self, k + "sum").add_(gw)
            else:      # norms only (the live monitor: one batch, whose full-batch norm is its own)
                sq, bsq = batch.ce_grad_sq[layer.name]
                self.norms_only = True
            norm = math.sqrt(sq)
            getattr(self, k + "norm").add_(norm)
            getattr(self, k + "per_batch").append(norm)
            if bsq is not None and layer.bias is not None:
                getattr(self, k + "bnorm").add_(math.sqrt(bsq))
        self.batches += 1

    def compute(self) -> ProbeResult:
        nb = float(self.batches)
        rows, arrays = [], {}
        for layer in self.layers:
            k = self._key(layer.name)
            gn = float(getattr(self, k + "norm")) / nb
            full = (gn if nb == 1 else None) if self.norms_only else math.sqrt(sum_of_squares(self.state(k + "sum"))) / nb
            wn = math.sqrt(weight_sum_of_squares(layer.weight))
            rows.append({"name": layer.name, "kind": layer.kind, "role": role(layer.module),
                         "grad_norm": finite_or_none(gn),
                         "full_grad_norm": None if full is None else finite_or_none(full), "weight_norm": finite_or_none(wn),
                         "relative": finite_or_none(gn / wn) if wn > 0 else None,
                         "bias_grad_norm": (finite_or_none(float(getattr(self, k + "bnorm")) / nb)
                                            if layer.bias is not None else None)})
            arrays[f"{layer.name}/grad_norm_per_batch"] = np.asarray(getattr(self, k + "per_batch"),
                                                                     dtype=np.float64)
        head = next((r for r in rows if r["name"] == self.ctx.head.name), rows[-1] if rows else None)
        head_gn = head["grad_norm"] if head else None
        for r in rows:
            r["to_head"] = (finite_or_none(r["grad_norm"] / head_gn)
                            if head_gn and r["grad_norm"] is not None else None)
        counted = [r for r in rows if r["role"] != "norm"]
        depth = counted[0]["to_head"] if counted else None
        below = [r for r in counted if r["name"] != self.ctx.head.name]
        top = below[-1] if below else None
        body = (finite_or_none(below[0]["grad_norm"] / top["grad_norm"])
                if top and top["grad_norm"] and below[0]["grad_norm"] is not None else None)
        return ProbeResult(figures=GradNormFigures(depth, tuple(LayerGradNorm(**r) for r in rows), self.ctx.head.name,
                                                   self.head_kind(), body, top["name"] if top else None,
                                                   rescale_unavailable(self.ctx)),
                           arrays=arrays)

    thresholds = ("min_depth_ratio",)
    columns = (Column("grad norm", "grad_norm", bar=True), Column("to head", "to_head"))

    @classmethod
    def judge(cls, figures: Figures, t: Thresholds) -> list[Verdict]:
        """First layer against the head (Fig. 2) — against the deepest layer below the head when the head is a
        maximum-entropy one (:mod:`ftdoctor.probes.head`), whose tiny weights shrink every backbone gradient
        alike; re-drawing that head (RIFLE) would throw ENTAME's away, so then the remedy is ``rescale``."""
        if t.min_depth_ratio is None:
            return []
        layers = [l for l in figures["layers"] if l.get("role", "affine") != "norm"]
        kind, head = figures.get("head_kind", ORDINARY), figures.get("head", "")
        if is_max_entropy(kind):
            where = f" ({layers[0]['name']} / {figures.get('backbone_top')}; {left_out(kind, head)})" if layers else ""
            return [bound("min_depth_ratio", figures.get("backbone_depth_ratio"), t.min_depth_ratio,
                          "gradient depth ratio of the backbone", where=where,
                          explanation="the lower layers will barely move when fine-tuning (RIFLE Fig. 2)",
                          suggestion=rescale_suggestion(figures.get("rescale_unavailable")))]
        where = f" ({layers[0]['name']} / head)" if layers else ""
        return [bound("min_depth_ratio", figures.get("depth_ratio"), t.min_depth_ratio, "gradient depth ratio",
                      where=where, explanation="the lower layers will barely move when fine-tuning (RIFLE Fig. 2)",
                      suggestion=Suggestion("fix", ("--method", "rifle"),
                                            also=Suggestion("trace", ("--method", "rifle"),
                                                            before="re-initialise the head periodically: ")))]

    def problems(self, result: ProbeResult) -> list[Finding]:
        bad = [r["name"] for r in result.figures["layers"]
               if r["grad_norm"] is None or not math.isfinite(r["grad_norm"])]
        if not bad:
            return []
        return [Finding(self.name, "error", f"NaN or Inf gradients in {', '.join(bad[:5])}",
                        Suggestion("inspect", before="check the weights and inputs for NaN/Inf: ", data=False))]

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        items = [("depth ratio (RIFLE)", fmt(figures.get("depth_ratio")))]
        if is_max_entropy(figures.get("head_kind")):
            items.append(("  of the backbone", f"{fmt(figures.get('backbone_depth_ratio'))}  (to "
                          f"{figures.get('backbone_top')}; judged: the {figures.get('head_kind')} head learns "
                          f"first by design, ENTAME §5)"))
        return items
