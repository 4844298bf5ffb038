"""``rescale`` — Krähenbühl et al.'s between-layer scale adjustment (§3.2, Alg. 2), function-preserving.

Scaling affine layer k (weight and bias) by ``r_k > 0`` and undoing it
downstream (:mod:`ftdoctor.fixes.scale_graph`) leaves the network's function
unchanged and multiplies the layer's change rate (§3, eq. 2; SPEC §1.2) by
exactly ``(r_p / r_k)²``, where ``r_p`` is the scale of the layer whose factor
was undone inside k (1 if none): its input grows by ``r_p``, the error
reaching its output shrinks by ``r_k``, its weight grows by ``r_k / r_p``.
(ReLU, pooling and the other homogeneous operations pass the factor through
exactly, and η_n is keyed by the example, so this holds per example.)

Two solvers:

* ``joint`` (default) — measure the rates once and solve for every
  ``x_k = ln r_k`` at once by linear least squares on
  ``ln c_k − 2 x_k + 2 x_p(k) = m`` (``m`` free); re-measure, and repeat only
  while ``spread`` is above ``--target-spread``, at most ``--max-iterations``
  rounds (default 5). On a chain the system is square and one round flattens
  the curve (Fig. 1a).
* ``paper`` — Alg. 2: target the geometric mean ``C̄`` of the rates, set
  ``r_k = (c_k / C̄)^(α/2)`` with damping ``α`` (``--damping``, default 0.25)
  for all layers simultaneously, undo, re-measure; ``--max-iterations`` rounds
  (default 10, the paper's "roughly 10 iterations").

Verified on the data: logits change by at most 1e-4 relative; ``spread``
before/after and the rounds used are reported, with the layers left alone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.fixes.base import Check, Fix, FixContext, FixOutcome, LeftAlone, layer_keys, register_fix
from ftdoctor.fixes.passes import max_logit_change, subset
from ftdoctor.fixes.scale_graph import ScalePlan, plan_rescale
from ftdoctor.probes.head import is_max_entropy

SOLVERS = ("joint", "paper")
LOGIT_TOLERANCE = 1e-4
_DEFAULT_ROUNDS = {"joint": 5, "paper": 10}


@dataclass(frozen=True)
class RescaleOptions:
    """``--solver``, ``--damping``, ``--target-spread``, ``--max-iterations``, ``--samples``."""

    solver: str = "joint"
    damping: float = 0.25
    target_spread: float = 1.2
    max_iterations: int | None = None     # None: 5 for joint, 10 for paper
    samples: int | None = None            # examples used to measure the rates (None: all)

    @property
    def rounds(self) -> int:
        return self.max_iterations if self.max_iterations is not None else _DEFAULT_ROUNDS[self.solver]

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise FtdoctorError(f"unknown --solver {self.solver!r}", f"use one of {', '.join(SOLVERS)}")
        if not 0.0 < self.damping <= 1.0:
            raise FtdoctorError(f"--damping must be in (0, 1], got {self.damping}",
                                "the paper uses 0.25")
        if not self.target_spread >= 1.0:
            raise FtdoctorError(f"--target-spread must be at least 1, got {self.target_spread}",
                                "spread is max/min of the change rates, so 1 is perfectly flat")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise FtdoctorError(f"--max-iterations must be at least 1, got {self.max_iterations}",
                                "pass a positive number of rounds")
        if self.samples is not None and self.samples < 1:
            raise FtdoctorError(f"--samples must be at least 1, got {self.samples}",
                                "pass how many examples measure the change rates")


# --------------------------------------------------------------------------- the two solvers

def solve_joint(log_rates: dict[str, float], free: Sequence[str], producer: dict[str, str]) -> dict[str, float]:
    """``x_k = ln r_k`` minimising Σ_k (ln c_k − 2x_k + 2x_p(k) − m)² over x and m (min-norm x).

    ``log_rates`` are the measured ``ln change_rate`` per layer, ``free`` the
    layers that may be rescaled, ``producer[k]`` the layer whose scale is
    undone in k. ``m`` (the common log rate) is eliminated by projecting onto
    the complement of its column, so the smallest adjustment is chosen among
    equally flat ones.
    """
    names = list(log_rates)
    index = {n: i for i, n in enumerate(free)}
    if not names or not index:
        return {n: 0.0 for n in free}
    A = np.zeros((len(names), len(index)))
    b = np.empty(len(names))
    for row, n in enumerate(names):
        b[row] = -log_rates[n]
        if n in index:
            A[row, index[n]] -= 2.0
        p = producer.get(n)
        if p is not None and p in index:
            A[row, index[p]] += 2.0
    ones = np.ones(len(names)) / math.sqrt(len(names))
    P = np.eye(len(names)) - np.outer(ones, ones)
    x, *_ = np.linalg.lstsq(P @ A, P @ b, rcond=None)
    return {n: float(x[index[n]]) for n in free}


def solve_paper(log_rates: dict[str, float], free: Sequence[str], damping: float) -> dict[str, float]:
    """Alg. 2: ``r_k = (c_k / C̄)^(α/2)`` with ``C̄`` the geometric mean of the rates."""
    if not log_rates:
        return {n: 0.0 for n in free}
    target = float(np.mean(list(log_rates.values())))
    return {n: 0.5 * damping * (log_rates[n] - target) if n in log_rates else 0.0 for n in free}


def predicted_log_rates(log_rates: dict[str, float], x: dict[str, float], producer: dict[str, str]) -> dict[str, float]:
    """``ln c_k − 2x_k + 2x_p(k)``: the exact rates after applying ``x`` (SPEC §2)."""
    return {n: v - 2.0 * x.get(n, 0.0) + 2.0 * x.get(producer.get(n, ""), 0.0) for n, v in log_rates.items()}


def spread_of(rates: Sequence[float]) -> float | None:
    return max(rates) / min(rates) if rates else None


# --------------------------------------------------------------------------- applying scales

@torch.no_grad()
def apply_scales(model: nn.Module, plan: ScalePlan, x: dict[str, float]) -> None:
    """Scale layer k by ``r_k = exp(x_k)`` (weight and bias) and undo it at its sink, exactly."""
    for name, xk in x.items():
        if xk == 0.0 or name not in plan.sinks:
            continue
        r = math.exp(xk)
        layer = model.get_submodule(name)
        layer.weight.mul_(r)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(r)
        sink = plan.sinks[name]
        target = model.get_submodule(sink.target)
        if sink.kind == "affine":
            target.weight.div_(r)
        else:  # BatchNorm in eval: (r z − r μ) / sqrt(r² σ² + ε) · γ' = (z − μ) / sqrt(σ² + ε) · γ
            var = target.running_var.to(torch.float64)
            eps = float(target.eps)
            factor = torch.sqrt(r * r * var + eps) / (r * torch.sqrt(var + eps))
            target.weight.mul_(factor.to(target.weight))
            target.running_mean.mul_(r)
            target.running_var.mul_(r * r)


# --------------------------------------------------------------------------- the fix

@dataclass
class _Measured:
    rates: dict[str, float]                 # layer -> change_rate (measured, > 0)
    layers: list[dict[str, Any]]            # the probe's per-layer figures
    spread: float | None
    log_std: float | None
    skipped: dict[str, str]


@dataclass
class _Before:
    reference: nn.Module
    plan: ScalePlan
    measured: _Measured


@dataclass
class _Applied:
    rounds: int
    history: list[float | None]
    x: dict[str, float]
    measured: _Measured


@register_fix(name="rescale", options_type=RescaleOptions, paper="Krähenbühl et al. 2016, §3.2, Alg. 2, Fig. 1a",
              summary="Krähenbühl et al. §3.2 (Alg. 2): function-preserving between-layer rescaling so that every "
                      "layer's change rate is the same", priority=30)
class Rescale(Fix[RescaleOptions]):
    def _measure(self, ctx: FixContext, description: str) -> _Measured:
        from ftdoctor.diagnose import ProbeOptions, probe_model
        data = subset(ctx.data, self.options.samples)
        run = probe_model(ctx.model, data, ProbeOptions(probes=("change_rate",), head=ctx.head.name, seed=ctx.seed),
                          device=ctx.device, layers=list(ctx.layers), description=description)
        fig = run.results["change_rate"].figures
        affine = {l.name for l in ctx.layers}      # embeddings and norms are measured but not rescaled
        rows = [l for l in fig["layers"] if l["name"] in affine]
        rates = {l["name"]: float(l["change_rate"]) for l in rows
                 if l["change_rate"] is not None and l["change_rate"] > 0}
        skipped = {s.name: s.reason for s in run.skipped}
        spread = max(rates.values()) / min(rates.values()) if rates else None
        log_std = float(np.std(np.log(list(rates.values())))) if rates else None
        if is_max_entropy(fig.get("head_kind")):
            # ENTAME's head learns first by design (~1e-6 weights): equalising the backbone to it would shrink
            # the backbone by that much; the backbone is equalised among itself and the head left as it is
            rates.pop(ctx.head.name, None)
            spread = max(rates.values()) / min(rates.values()) if rates else None
            log_std = float(np.std(np.log(list(rates.values())))) if rates else None
            skipped[ctx.head.name] = (f"the {fig['head_kind']} head: it learns first by design (ENTAME §5), so the "
                                      "backbone is equalised among itself")
        return _Measured(rates=rates, layers=rows, spread=spread, log_std=log_std, skipped=skipped)

    def before(self, ctx: FixContext) -> _Before:
        plan = plan_rescale(ctx.model, ctx.layers, ctx.head)
        return _Before(reference=copy.deepcopy(ctx.model), plan=plan,
                       measured=self._measure(ctx, "change rates (before)"))

    def apply(self, ctx: FixContext, before: _Before) -> _Applied:
        opts = self.options
        plan, measured = before.plan, before.measured
        free = [l.name for l in ctx.layers if l.name in plan.sinks]
        total = {n: 0.0 for n in free}
        history = [measured.spread]
        rounds = 0
        while (measured.spread is not None and measured.spread > opts.target_spread
               and rounds < opts.rounds and free):
            log_rates = {n: math.log(c) for n, c in measured.rates.items()}
            if opts.solver == "joint":
                x = solve_joint(log_rates, free, plan.producer)
            else:
                x = solve_paper(log_rates, free, opts.damping)
            apply_scales(ctx.model, plan, x)
            for n, v in x.items():
                total[n] += v
            rounds += 1
            previous = measured.spread
            measured = self._measure(ctx, f"change rates (round {rounds})")
            history.append(measured.spread)
            if (opts.solver == "joint" and measured.spread is not None
                    and measured.spread > previous * 0.99):
                break   # the least-squares optimum is reached: more rounds cannot flatten further
        return _Applied(rounds=rounds, history=history, x=total, measured=measured)

    def verify(self, ctx: FixContext, before: _Before, applied: _Applied) -> FixOutcome:
        opts = self.options
        rel, absolute = max_logit_change(before.reference, ctx.model, ctx.data, ctx.device)
        m0, m1 = before.measured, applied.measured
        checks = [
            Check("logit_change", after=rel, target=f"≤ {LOGIT_TOLERANCE:g} relative",
                  passed=rel is not None and rel <= LOGIT_TOLERANCE),
            Check("spread", before=m0.spread, after=m1.spread, target=f"≤ {opts.target_spread:g} (aim)"),
            Check("log_std", before=m0.log_std, after=m1.log_std, target="0 = flat (Fig. 1a)"),
            Check("rounds", after=float(applied.rounds), target=f"≤ {opts.rounds}"),
        ]
        left = [LeftAlone(n, m0.skipped.get(n, r) if n == ctx.head.name else r)
                for n, r in before.plan.blocked.items()]
        left += [LeftAlone(n, f"no change rate: {r}") for n, r in m1.skipped.items()
                 if n in before.plan.sinks]
        after_by_name = {l["name"]: l for l in m1.layers}
        layers = []
        for layer in ctx.layers:
            sink = before.plan.sinks.get(layer.name)
            b = next((l for l in m0.layers if l["name"] == layer.name), None)
            a = after_by_name.get(layer.name)
            layers.append({"name": layer.name, "kind": layer.kind,
                           "change_rate_before": b["change_rate"] if b else None,
                           "change_rate_after": a["change_rate"] if a else None,
                           "scale": math.exp(applied.x.get(layer.name, 0.0)),
                           "undone_in": sink.target if sink else None,
                           "undo": sink.kind if sink else None})
        touched = [n for n, v in applied.x.items() if v != 0.0]
        names = touched + [before.plan.sinks[n].target for n in touched]
        notes = []
        if m1.spread is not None and m1.spread > opts.target_spread:
            reason = ("more rounds (--max-iterations) would flatten it further" if opts.solver == "paper"
                      else "layers left alone (below) pin some rates")
            notes.append(f"spread {m1.spread:.3g} is still above --target-spread {opts.target_spread:g}: {reason}")
        return FixOutcome(
            parameters={"solver": opts.solver, "damping": opts.damping if opts.solver == "paper" else None,
                        "target_spread": opts.target_spread, "max_iterations": opts.rounds,
                        "samples": opts.samples, "rounds": applied.rounds},
            checks=checks, changes=layer_keys(ctx.model, names),
            figures={"logit_change": rel, "logit_change_abs": absolute, "spread_before": m0.spread,
                     "spread_after": m1.spread, "log_std_before": m0.log_std, "log_std_after": m1.log_std,
                     "rounds": applied.rounds, "spread_per_round": applied.history, "layers": layers},
            left_alone=left, notes=notes)
