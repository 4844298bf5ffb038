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

import numpy as np
import torch

from ftdoctor.engine.sums import Float64Sum, sum_of_squares
from ftdoctor.probes.base import (Batch, Finding, Probe, ProbeContext, ProbeResult, finite_or_none, register_probe)
from ftdoctor.thresholds import Thresholds


@register_probe
class GradNormProbe(Probe):
    name = "grad_norm"
    description = "RIFLE: per-layer gradient Frobenius norms of the cross-entropy (Fig. 2)"
    needs = frozenset({"ce_grads"})

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.layers = list(ctx.layers)
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
        for layer in self.layers:
            k = self._key(layer.name)
            gw, gb = batch.ce_grads[layer.name]
            norm = math.sqrt(sum_of_squares(gw))
            getattr(self, k + "norm").add_(norm)
            getattr(self, k + "sum").add_(gw)
            getattr(self, k + "per_batch").append(norm)
            if gb is not None and layer.bias is not None:
                getattr(self, k + "bnorm").add_(math.sqrt(sum_of_squares(gb)))
        self.batches += 1

    def compute(self) -> ProbeResult:
        nb = float(self.batches)
        rows, arrays = [], {}
        for layer in self.layers:
            k = self._key(layer.name)
            gn = float(getattr(self, k + "norm")) / nb
            full = math.sqrt(sum_of_squares(self.state(k + "sum"))) / nb
            wn = math.sqrt(sum_of_squares(layer.weight))
            rows.append({"name": layer.name, "kind": layer.kind, "grad_norm": finite_or_none(gn),
                         "full_grad_norm": finite_or_none(full), "weight_norm": finite_or_none(wn),
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
        depth = rows[0]["to_head"] if rows else None
        return ProbeResult(figures={"depth_ratio": depth, "layers": rows}, arrays=arrays)

    def findings(self, result: ProbeResult, thresholds: Thresholds) -> list[Finding]:
        f = result.figures
        out: list[Finding] = []
        bad = [r["name"] for r in f["layers"] if r["grad_norm"] is None or not math.isfinite(r["grad_norm"])]
        if bad:
            out.append(Finding(self.name, "error", f"NaN or Inf gradients in {', '.join(bad[:5])}",
                               "check the weights and inputs for NaN/Inf (`ftdoctor inspect`)"))
            return out
        depth = f.get("depth_ratio")
        if depth is not None and depth < thresholds.min_depth_ratio:
            out.append(Finding(
                self.name, "warning",
                f"the first layer's gradient is {depth:.2g}x the head's: the lower layers will barely "
                f"move when fine-tuning (RIFLE Fig. 2)",
                "ftdoctor fix MODEL --method rifle --data DATA -o FIXED.pt  (re-initialise the head "
                "periodically: ftdoctor trace --method rifle)"))
        return out
