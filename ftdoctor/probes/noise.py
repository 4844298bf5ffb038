"""Noise energy of the back-propagated error at the head — ENTAME (Varno et al. 2019), §4.

Per example the error at the head's output is ``e = ŷ − y`` (ENTAME eq. 7) and
its energy splits as ``φ = ‖ŷ‖² + ‖y‖² − 2ŷ·y`` (eq. 12). At a fresh head the
energy of the estimates ζ = E‖ŷ‖² is pure noise (Table 1 reports ζ/φ); its
floor is 1/C, reached at uniform ŷ (eqs. 13–17), where the cross-entropy is
ln C. ``backbone_error_energy`` = E‖e Wᴸ‖² is what eq. 8 passes on into the
backbone. With ``--new-head --seeds K`` (the Table 1 setting) the backbone's
features are computed once per batch and K fresh heads are applied to them;
every key is then the mean over heads with a Student-t ``*_ci95`` half-width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ftdoctor.heads import seed_head_params
from ftdoctor.numbers import fmt
from ftdoctor.probes.base import Batch, Figures, Finding, Probe, ProbeContext, ProbeResult, register_probe
from ftdoctor.probes.verdicts import Suggestion, Verdict, bound
from ftdoctor.stats import ci95_half_width
from ftdoctor.thresholds import FloorMultiple, Thresholds

KEYS = ("estimate_energy", "label_energy", "correct_prob", "total_energy", "noise_fraction",
        "excess_noise_fraction", "uniform_noise_fraction", "max_entropy_noise_fraction", "cross_entropy",
        "max_entropy_loss", "mean_entropy", "label_fit", "backbone_error_energy", "feature_energy")

#: a head whose label fit (κ − 1/C)/(1 − 1/C) reaches this predicts the labels: it is not a fresh head, and
#: ζ/φ measures its confidence rather than noise (ENTAME's reading holds at a fresh head, Table 1)
TRAINED_LABEL_FIT = 0.25

_SUMS = ("zeta", "label", "kappa", "ce", "entropy", "backbone")


def noise_figures(zeta: float, label: float, kappa: float, ce: float, entropy: float,
                  backbone: float, feature: float | None, num_classes: int) -> dict[str, float | None | str]:
    """The keys of SPEC §1.1 from the per-example means."""
    phi = zeta + label - 2.0 * kappa
    c = num_classes
    fig: dict[str, float | None | str] = {
        "estimate_energy": zeta, "label_energy": label, "correct_prob": kappa, "total_energy": phi,
        "max_entropy_noise_fraction": 1.0 / (c - 1) if c > 1 else None,
        "cross_entropy": ce, "max_entropy_loss": math.log(c), "mean_entropy": entropy,
        "label_fit": (kappa - 1.0 / c) / (1.0 - 1.0 / c) if c > 1 else None,
        "backbone_error_energy": backbone, "feature_energy": feature,
    }
    fractions = ("noise_fraction", "excess_noise_fraction", "uniform_noise_fraction")
    if not math.isfinite(phi):
        fig.update(dict.fromkeys(fractions))
        fig["reason"] = "the model's outputs on the data are NaN or Inf"
    elif phi > 0.0:
        # ζ/φ = (1/C)/φ + (ζ − 1/C)/φ: the part any output has (uniform ŷ has ζ = 1/C) plus the excess
        fig["noise_fraction"] = zeta / phi
        fig["excess_noise_fraction"] = (zeta - 1.0 / c) / phi
        fig["uniform_noise_fraction"] = (1.0 / c) / phi
    else:
        fig.update(dict.fromkeys(fractions))
        fig["reason"] = "total error energy is 0 (every prediction is exactly right)"
    # JSON has no NaN/Inf: a figure a non-finite model spoils is null
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fig.items()}


@dataclass(frozen=True)
class NoiseFigures(Figures):
    """SPEC §1.1's keys; with ``--new-head --seeds K`` each is the mean over K fresh heads, with ``*_ci95``."""

    estimate_energy: float | None
    label_energy: float | None
    correct_prob: float | None
    total_energy: float | None
    noise_fraction: float | None
    excess_noise_fraction: float | None
    max_entropy_noise_fraction: float | None
    cross_entropy: float | None
    max_entropy_loss: float | None
    mean_entropy: float | None
    backbone_error_energy: float | None
    feature_energy: float | None
    uniform_noise_fraction: float | None = None   # (1/C)/φ: noise_fraction = this + excess_noise_fraction
    label_fit: float | None = None     # (κ − 1/C)/(1 − 1/C): 0 at chance, 1 when every label is certain
    head_state: str = "as loaded"      # "fresh" (--new-head) or "as loaded"
    reason: str | None = None          # why the fractions are undefined
    seeds: int | None = None           # heads averaged over (--seeds), else None
    ci95: tuple[tuple[str, float | None], ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.seeds:
            ci = dict(self.ci95)
            out: dict[str, Any] = {"seeds": self.seeds, "head_state": self.head_state}
            for key in KEYS:
                out[key] = getattr(self, key)
                out[f"{key}_ci95"] = ci.get(key)
            return out
        order = ("estimate_energy", "label_energy", "correct_prob", "total_energy", "max_entropy_noise_fraction",
                 "cross_entropy", "max_entropy_loss", "mean_entropy", "label_fit", "backbone_error_energy",
                 "feature_energy", "noise_fraction", "uniform_noise_fraction", "excess_noise_fraction")
        out = {key: getattr(self, key) for key in order}
        out["head_state"] = self.head_state
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@register_probe(name="noise", description="ENTAME: energy of the error at the head that is noise (Table 1)",
                needs=frozenset({"head_input"}), priority=10)
class NoiseProbe(Probe):

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.seeds = max(1, ctx.seeds) if ctx.new_head else 1
        self.heads: list[tuple[Tensor, Tensor | None]] = []
        head = ctx.head.module
        if self.seeds > 1:
            for k in range(self.seeds):
                w, b = seed_head_params(head.weight.shape, getattr(head, "bias", None) is not None,
                                        ctx.head_init, ctx.seed, k)
                self.heads.append((w.to(head.weight), None if b is None else b.to(head.weight)))
        if ctx.scripted:   # no hook inside a TorchScript model: the head's input is not seen
            self.needs = frozenset()
            self.skip(ctx.head.name, "feature_energy needs the head's input, which a TorchScript model does not "
                                     "expose to Python hooks")
        k = self.seeds
        dev = head.weight.device          # the sums live where the logits are (--device cuda)
        self.add_state("count", torch.zeros((), dtype=torch.float64, device=dev))
        for s in _SUMS:
            self.add_state(s, torch.zeros(k, dtype=torch.float64, device=dev))
        self.add_state("feature", torch.zeros((), dtype=torch.float64, device=dev))
        self.add_state("nonfinite", torch.zeros((), dtype=torch.float64, device=dev))

    def _logits_per_head(self, batch: Batch) -> list[tuple[Tensor, Tensor]]:
        """(logits, head weight) per seed; without seeds the model's own logits and head."""
        head = self.ctx.head.module
        if not self.heads:
            return [(batch.logits, head.weight.detach())]
        feats = batch.head_input
        out = []
        for w, b in self.heads:
            logits = torch.func.functional_call(head, {"weight": w, **({"bias": b} if b is not None else {})},
                                                (feats,))
            out.append((logits.detach(), w))
        return out

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        if batch.size == 0:
            return
        y = batch.y
        onehot = F.one_hot(y, self.ctx.num_classes).to(torch.float64)
        for k, (logits, w) in enumerate(self._logits_per_head(batch)):
            z = logits.to(torch.float64)
            logp = F.log_softmax(z, dim=1)
            p = logp.exp()
            self.nonfinite += float((~torch.isfinite(z)).any())
            self.zeta[k] += (p * p).sum()
            self.label[k] += (onehot * onehot).sum()
            self.kappa[k] += (p * onehot).sum()
            self.ce[k] += F.nll_loss(logp, y, reduction="sum")
            self.entropy[k] += -(p * logp).nan_to_num().sum()
            e = p - onehot                                   # ENTAME eq. 7
            if w.dim() == 2:
                self.backbone[k] += ((e @ w.to(torch.float64)) ** 2).sum()   # eq. 8
        if batch.head_input is not None:
            f = batch.head_input.to(torch.float64)
            self.feature += (f.reshape(f.shape[0], -1) ** 2).sum()
        self.count += batch.size

    def compute(self) -> ProbeResult:
        n = float(self.count)
        c = self.ctx.num_classes
        w = self.ctx.head.module.weight
        per_seed = []
        for k in range(self.seeds):
            fig = noise_figures(float(self.zeta[k]) / n, float(self.label[k]) / n, float(self.kappa[k]) / n,
                                float(self.ce[k]) / n, float(self.entropy[k]) / n,
                                float(self.backbone[k]) / n if w.dim() == 2 else None,
                                float(self.feature) / n if "head_input" in self.needs else None, c)
            per_seed.append(fig)
        if self.seeds == 1:
            figures = per_seed[0]
            if w.dim() != 2:
                self.skip(self.ctx.head.name, "backbone_error_energy needs a Linear head")
            return ProbeResult(figures=NoiseFigures(**figures, head_state=self.head_state))
        means: dict[str, Any] = {}
        ci: list[tuple[str, float | None]] = []
        arrays: dict[str, np.ndarray] = {}
        for key in KEYS:
            vals = [f[key] for f in per_seed]
            if any(v is None for v in vals):
                means[key] = None
                ci.append((key, None))
                continue
            means[key] = float(np.mean(vals))
            ci.append((key, ci95_half_width([float(v) for v in vals])))
            arrays[f"per_seed/{key}"] = np.asarray(vals, dtype=np.float64)
        return ProbeResult(figures=NoiseFigures(**means, seeds=self.seeds, ci95=tuple(ci), head_state=self.head_state),
                           arrays=arrays)

    @property
    def head_state(self) -> str:
        return "fresh" if self.ctx.new_head else "as loaded"

    thresholds = ("max_noise_fraction", "max_excess_noise_fraction")

    @classmethod
    def trained(cls, figures: Figures) -> bool:
        """The head as loaded predicts these labels (label fit ≥ :data:`TRAINED_LABEL_FIT`): ζ/φ is then its
        confidence, not ENTAME's noise, which is a fresh head's (a fresh head's fit is ≈ 0)."""
        fit = figures.get("label_fit")
        return figures.get("head_state") != "fresh" and fit is not None and fit >= TRAINED_LABEL_FIT

    @classmethod
    def judge(cls, figures: Figures, t: Thresholds) -> list[Verdict]:
        """ζ/φ against ``max_noise_fraction`` (a multiple of the floor 1/(C−1) by default) and (ζ − 1/C)/φ
        against ``max_excess_noise_fraction``; not judged on a head that already predicts the labels."""
        out = []
        floor = figures.get("max_entropy_noise_fraction")
        for key, figure, what in (("max_noise_fraction", "noise_fraction", "noise fraction"),
                                  ("max_excess_noise_fraction", "excess_noise_fraction", "excess noise fraction")):
            threshold = getattr(t, key)
            if threshold is None:
                continue
            relative = isinstance(threshold, FloorMultiple)
            if relative:
                if floor is None:
                    continue
                threshold = threshold.of(floor)
            value, phi = figures.get(figure), figures.get("total_energy")
            if value is None and isinstance(phi, (int, float)) and phi == 0:
                # φ = 0: every prediction is exactly right, so there is no error and no noise in it
                out.append(Verdict(key, True, None, threshold,
                                   f"{what} undefined: {figures.get('reason') or 'total error energy is 0'}"))
            elif value is None and not (isinstance(phi, (int, float)) and math.isfinite(phi)):
                out.append(Verdict(key, False, None, threshold,
                                   f"{what} could not be measured: the model's outputs on the data are NaN or Inf"))
            elif cls.trained(figures):
                out.append(Verdict(key, None, value, threshold,
                                   f"{what} {fmt(value)} not judged: the head predicts these labels (label fit "
                                   f"{fmt(figures.get('label_fit'))} >= {TRAINED_LABEL_FIT:g}), so ζ/φ is its "
                                   f"confidence; ENTAME's noise is read at a fresh head (--new-head)"))
            else:
                v = bound(key, value, threshold, what,
                          explanation="the head's first updates send mostly noise into the backbone "
                                      "(ENTAME Table 1)",
                          suggestion=Suggestion("fix", ("--method", "entame")))
                if relative:
                    v = replace(v, message=f"{v.message} (= {getattr(t, key)} the floor 1/(C-1) = {floor:.4g})")
                out.append(v)
        return out

    def problems(self, result: ProbeResult) -> list[Finding]:
        if float(self.nonfinite) > 0:
            return [Finding(self.name, "error", "the model's logits contain NaN or Inf on the data",
                            Suggestion("inspect", before="check the input normalisation, and the weights: ",
                                       data=False))]
        return []

    def findings(self, result: ProbeResult, thresholds: Thresholds) -> list[Finding]:
        """One finding for both fractions: above their bounds (a warning), near the floor (info), or not judged
        on a trained head (info)."""
        problems = self.problems(result)
        if problems:
            return problems
        f = result.figures
        verdicts = [v for v in self.judge(f, thresholds) if v.value is not None]
        failed = [v for v in verdicts if v.passed is False]
        if failed:
            return [Finding(self.name, "warning", "; ".join(v.message for v in failed) + ": the head's first "
                            "updates send mostly noise into the backbone (ENTAME Table 1)",
                            Suggestion("fix", ("--method", "entame")))]
        if verdicts and verdicts[0].passed is None:
            return [Finding(self.name, "info", verdicts[0].message, None)]
        nf, floor = f.get("noise_fraction"), f.get("max_entropy_noise_fraction")
        if nf is None or floor is None or not verdicts:
            return []
        return [Finding(self.name, "info", f"noise fraction {nf:.3f} is within its bounds (floor 1/(C-1) = "
                        f"{floor:.3f})", None)]

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        def with_ci(key: str) -> str:
            half = figures.get(f"{key}_ci95")
            return fmt(figures.get(key)) + (f" ± {fmt(half)}" if half is not None else "")
        floor = fmt(figures.get("max_entropy_noise_fraction"))
        items = [("noise fraction ζ/φ (ENTAME)",
                  f"{with_ci('noise_fraction')} = uniform part (1/C)/φ {with_ci('uniform_noise_fraction')} + excess "
                  f"(ζ−1/C)/φ {with_ci('excess_noise_fraction')}; floor 1/(C−1) = {floor} at uniform output")]
        if cls.trained(figures):
            items.append(("  on this head", f"the head predicts these labels (label fit {fmt(figures.get('label_fit'))}"
                          "): ζ/φ is its confidence, not noise — ENTAME's noise is a fresh head's (--new-head)"))
        items += [("cross-entropy", f"{with_ci('cross_entropy')}  (ln C = {fmt(figures.get('max_entropy_loss'))})"),
                  ("correct-class probability", f"{with_ci('correct_prob')}  (label fit {with_ci('label_fit')}: "
                                                "0 at chance, 1 certain)"),
                  ("error energy into the backbone", with_ci("backbone_error_energy"))]
        if figures.get("seeds"):
            items.append(("fresh heads (seeds)", f"{figures['seeds']}: every figure is their mean ± 95% CI; the "
                                                 "first is the head --new-head alone installs"))
        return items
