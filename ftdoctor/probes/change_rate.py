"""Per-layer change rates — Krähenbühl et al. 2016, §3 and Fig. 1.

With a random linear loss ``ℓ_n = η_n·logits_n``, ``η_n ~ N(0, I)`` (§3: the
loss is label-free, so the rates describe the network, not the task), the
expected squared gradient ``G²_k = E_n[(∂ℓ_n/∂W_k)²]`` over the weights' size
``E[W_k²]`` is the rate at which layer k changes under SGD (§3, "change rate"
``C̃_k``); §3.2 (Alg. 2) rescales layers until these rates agree.

* per-element rate ``c_{k,e} = sqrt(G²_{k,e} / mean(W_k²))``
* ``change_rate`` ``= sqrt(mean(G²_k) / mean(W_k²))``
* ``cv`` = std/mean of ``c_{k,e}``; ``column_cv`` the same over input columns
* ``spread`` = max/min of the rates; ``log_std`` = std of their logs (0 = flat, Fig. 1a)

Embeddings and normalisation layers are measured too (:mod:`ftdoctor.engine.norm_squares`, beyond BackPACK);
an embedding counts as an affine layer (of a one-hot input) in ``spread``, but its cv is not judged (the rows
of tokens the data never uses get no gradient: the cv would measure vocabulary coverage); a norm layer's row
is reported but left out of ``spread``, ``log_std`` and the cv judgement (``role`` = ``norm``).

``exact`` mode sums per-example squares (batched); ``batch`` mode squares the
batch gradient and divides by the batch size — unbiased because the η_n are
independent with zero mean, so the cross terms vanish in expectation.
``totals`` mode (the live monitor's default) sums only ``Σ_n ‖∂ℓ_n/∂W_k‖²`` per layer
(:mod:`ftdoctor.engine.ghost`): the same change rates and spread at a fraction of the cost, no cv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ftdoctor.engine import persample
from ftdoctor.engine.norm_squares import role
from ftdoctor.engine.sums import Float64Sum, weight_sum_of_squares
from ftdoctor.numbers import fmt
from ftdoctor.probes.base import (Batch, Column, Figures, Probe, ProbeContext, ProbeResult, finite_or_none,
                                  register_probe, row_json)
from ftdoctor.probes.head import ORDINARY, HeadWatch, is_max_entropy, left_out
from ftdoctor.probes.verdicts import Suggestion, Verdict, bound, rescale_suggestion, rescale_unavailable
from ftdoctor.thresholds import Thresholds


def rate_figures(g2: torch.Tensor, weight: torch.Tensor) -> dict[str, float | None]:
    """change_rate, cv and column_cv of one layer from its G² (float64) and weight.

    With ``c_e = sqrt(G²_e / w2)``: ``mean(c²) = mean(G²)/w2`` is the squared change rate, so
    ``std(c)² = mean(c²) − mean(c)²`` needs one pass over the weights (a square root and a sum,
    in float64) instead of materialising ``c``.
    """
    w2 = weight_sum_of_squares(weight) / max(1, weight.numel())
    if w2 <= 0.0:
        return {"change_rate": None, "cv": None, "column_cv": None}
    mean_g2 = float(g2.mean())
    rate = math.sqrt(mean_g2 / w2)
    cv = _cv(mean_g2 / w2, float(g2.sqrt().mean()) / math.sqrt(w2))
    # per input column j: the mean of G² over the outputs and the kernel positions
    cols = g2.mean(dim=[d for d in range(g2.dim()) if d != 1]) if g2.dim() > 1 else g2
    column_cv = _cv(float((cols / w2).mean()), float((cols / w2).sqrt().mean()))
    return {"change_rate": finite_or_none(rate), "cv": None if cv is None else finite_or_none(cv),
            "column_cv": None if column_cv is None else finite_or_none(column_cv)}


def total_rate(g2_total: torch.Tensor, weight: torch.Tensor) -> dict[str, float | None]:
    """change_rate of one layer from ``Σ_e G²_e`` alone (``totals`` mode, :mod:`ftdoctor.engine.ghost`): the
    same rate as :func:`rate_figures`; the cv and column cv need the per-element squares (None)."""
    w2 = weight_sum_of_squares(weight) / max(1, weight.numel())
    mean_g2 = float(g2_total) / max(1, weight.numel())
    rate = math.sqrt(mean_g2 / w2) if w2 > 0.0 else None
    return {"change_rate": None if rate is None else finite_or_none(rate), "cv": None, "column_cv": None}


def _spread(rates: list[float]) -> float | None:
    return finite_or_none(max(rates) / min(rates)) if rates else None


def _cv(mean_sq: float, mean: float) -> float | None:
    """std/mean of non-negative values from their mean square and mean (None when the mean is 0)."""
    if not mean > 0:
        return None
    return math.sqrt(max(0.0, mean_sq - mean * mean)) / mean


@dataclass(frozen=True)
class LayerRate:
    """One layer of Fig. 1: its change rate and the cv of its per-weight (and per-input-column) rates."""

    name: str
    kind: str
    change_rate: float | None
    cv: float | None
    column_cv: float | None
    role: str = "affine"               # affine | embedding | norm (engine.norm_squares.role: norms not judged)


@dataclass(frozen=True)
class ChangeRateFigures(Figures):
    mode: str                          # exact | batch | totals (the live monitor's: no cv)
    loss: str                          # random | ce
    spread: float | None               # max/min change rate (Fig. 1a)
    log_std: float | None              # std of ln change rate
    layers: tuple[LayerRate, ...]
    head: str = ""                     # the head's name
    head_kind: str = ORDINARY          # ordinary | max-entropy | feature-normalised max-entropy (probes.head)
    backbone_spread: float | None = None   # spread without the head
    rescale_unavailable: str | None = None  # why fix --method rescale cannot help this model (None: it can)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "loss": self.loss, "spread": self.spread, "log_std": self.log_std,
                "head": self.head, "head_kind": self.head_kind, "backbone_spread": self.backbone_spread,
                "rescale_unavailable": self.rescale_unavailable, "layers": [row_json(r) for r in self.layers]}


@register_probe(name="change_rate",
                description="Krähenbühl et al.: per-layer change rates under a random loss (Fig. 1)", priority=20)
class ChangeRateProbe(HeadWatch, Probe):
    measures_norms = True

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.watch_head()
        self.mode = ctx.change_rate_mode
        self.loss = ctx.change_rate_loss
        if ctx.scripted and self.mode == "exact" and self.loss == "random":
            # per-example squares need hooks; the batch estimate of the same G² needs only autograd
            self.mode = "batch"
            self.notes.append("change_rate: a TorchScript model runs no Python hooks, so its per-example "
                              "squares cannot be formed; measured with the batch estimate (mode batch) instead")
        self.per_example = self.mode in ("exact", "totals")
        self.needs = frozenset({"grad_sq"}) if self.per_example else frozenset({"rand_grads"})
        self.layers = list(ctx.measured_layers)
        # exact: per-example squares of this process's examples (summed across processes);
        # batch: squares of the all-reduced global batch gradient (already identical everywhere)
        reduce = "sum" if self.per_example else "replicated"
        self.add_state("count", torch.zeros((), dtype=torch.float64), reduce)
        for layer in self.layers:
            self.add_state(self._key(layer.name), Float64Sum(layer.weight.shape, layer.weight.device), reduce)
        self.add_state("missing", torch.zeros(len(self.layers), dtype=torch.float64))
        self._result: ProbeResult | None = None

    def unavailable(self) -> str | None:
        if self.ctx.scripted and self.loss == "ce":
            return ("--change-rate-loss ce needs per-example gradients, which a TorchScript model cannot give "
                    "(it runs no Python hooks); use the random loss (its batch estimate works) or the eager "
                    "checkpoint")
        return None

    @staticmethod
    def _key(name: str) -> str:
        return "g2__" + name.replace(".", "__")

    def grad_sq_sink(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Where the engine may add a layer's per-example squares in place (exact mode): this probe's
        running sum, in the layout of the first batch's squares; ``None`` to be handed a tensor."""
        if self.mode != "exact":
            return None
        acc = getattr(self, self._key(name), None)
        return acc.sink(dtype) if isinstance(acc, Float64Sum) else None

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        if self.per_example and batch.size == 0:
            return
        self.see_logits(batch)
        for i, layer in enumerate(self.layers):
            key = self._key(layer.name)
            if self.per_example:
                sq = batch.grad_sq.get(layer.name)
                if sq is None:
                    self.missing[i] += 1
                    continue
                acc = getattr(self, key)
                if sq is acc.sink(sq.dtype):    # the engine added it in place already
                    acc.added_in_place_(sq)
                else:
                    acc.add_(sq)
            else:
                getattr(self, key).add_square_(batch.rand_grads[layer.name][0])
        self.count += batch.size if self.per_example else batch.global_size

    def compute(self) -> ProbeResult:
        if self._result is not None:     # compute() turns the sums into means in place: once only
            return self._result
        n = float(self.count)
        layers, arrays, rates, body = [], {}, [], []
        for i, layer in enumerate(self.layers):
            if self.per_example and float(self.missing[i]) > 0:
                reason = persample.supports(layer.module) or (
                    "its per-example gradient could not be formed (used more than once per forward, applied "
                    "to something shared by the whole batch, as BERT's position embeddings are, or not on "
                    "the path to the logits)")
                self.skip(layer.name, reason)
                continue
            # the sum becomes the mean, no float64 copy; clamped: squares added in place by the
            # pair-expanded kernel may leave rounding residues just below 0 where G² is 0
            g2 = self.state(self._key(layer.name)).div_(n).clamp_(min=0)
            setattr(self, self._key(layer.name), g2)
            fig = rate_figures(g2, layer.weight) if g2.dim() or not layer.weight.dim() else total_rate(g2, layer.weight)
            if fig["change_rate"] is None:
                self.skip(layer.name, "its weight is all zeros (or the rate is not finite): no change rate")
            layers.append(LayerRate(layer.name, layer.kind, **fig, role=role(layer.module)))
            if g2.dim() or not layer.weight.dim():
                arrays[f"{layer.name}/grad_sq_mean"] = np.ascontiguousarray(g2.cpu().numpy())
            if fig["change_rate"] is not None and fig["change_rate"] > 0 and role(layer.module) != "norm":
                rates.append(fig["change_rate"])
                if layer.name != self.ctx.head.name:
                    body.append(fig["change_rate"])
        log_std = float(np.std(np.log(rates))) if rates else None
        self._result = ProbeResult(figures=ChangeRateFigures(
            self.mode, self.loss, _spread(rates), log_std, tuple(layers), self.ctx.head.name, self.head_kind(),
            _spread(body), rescale_unavailable(self.ctx)), arrays=arrays)
        return self._result

    thresholds = ("max_change_rate_spread", "max_change_rate_cv")
    columns = (Column("change rate", "change_rate", bar=True), Column("cv", "cv"))

    @classmethod
    def judge(cls, figures: Figures, t: Thresholds) -> list[Verdict]:
        """Spread over all layers (Fig. 1a) — over the backbone when the head is a maximum-entropy one
        (:mod:`ftdoctor.probes.head`) — and the largest within-layer cv (Fig. 1b)."""
        out = []
        kind, head = figures.get("head_kind", ORDINARY), figures.get("head", "")
        body = is_max_entropy(kind)
        layers = [l for l in figures["layers"] if l.get("change_rate") is not None
                  and not (body and l["name"] == head) and l.get("role", "affine") != "norm"]
        if t.max_change_rate_spread is not None:
            parts = []
            if layers:
                fast = max(layers, key=lambda l: l["change_rate"])
                slow = min(layers, key=lambda l: l["change_rate"])
                parts.append(f"fastest {fast['name']}, slowest {slow['name']}")
            if body:
                parts.append(left_out(kind, head))
            where = f" ({'; '.join(parts)})" if parts else ""
            out.append(bound("max_change_rate_spread", figures.get("backbone_spread" if body else "spread"),
                             t.max_change_rate_spread,
                             "change-rate spread of the backbone" if body else "change-rate spread", where=where,
                             explanation="layers learn at very different speeds (Krähenbühl et al. Fig. 1a)",
                             suggestion=rescale_suggestion(figures.get("rescale_unavailable"))))
        if t.max_change_rate_cv is not None and figures.get("mode") != "totals":   # totals: no per-element cv
            # An embedding's rows of tokens the data never uses get no gradient: its cv measures the data's
            # vocabulary coverage, not the layer's conditioning, and datadep does not apply to a lookup table.
            cvs = [l for l in figures["layers"] if l.get("cv") is not None and not (body and l["name"] == head)
                   and l.get("role", "affine") == "affine"]
            worst = max(cvs, key=lambda l: l["cv"]) if cvs else None
            above = [l["name"] for l in cvs if l["cv"] > t.max_change_rate_cv]
            out.append(bound("max_change_rate_cv", worst["cv"] if worst else None, t.max_change_rate_cv,
                             "largest within-layer change-rate cv",
                             where=f" ({worst['name']})" if worst else " (no layer measured)",
                             explanation="per-weight rates vary a lot inside the layer (Krähenbühl et al. "
                                         "Fig. 1b)" + (f"; {len(above)} layers above it" if len(above) > 1 else ""),
                             suggestion=Suggestion("fix", ("--method", "datadep", "--layers",
                                                           ",".join(above) or (worst["name"] if worst else "L"))),
                             severity="info"))
        return out

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        items = [("change-rate spread (Krähenbühl)", f"{fmt(figures.get('spread'))}  (log std "
                  f"{fmt(figures.get('log_std'))}; {figures.get('mode')}, {figures.get('loss')} loss)")]
        if is_max_entropy(figures.get("head_kind")):
            items.append(("  of the backbone", f"{fmt(figures.get('backbone_spread'))}  (judged: the "
                          f"{figures.get('head_kind')} head learns first by design, ENTAME §5)"))
        return items
