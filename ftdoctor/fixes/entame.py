"""``entame`` — the maximum-entropy head of ENTAME (Varno et al. 2019, §5).

The head is re-drawn as ``W ~ N(0, φ_w)``, ``b = 0`` (eq. 21) with ``φ_w`` from
``--phi-w`` (default 1e-12, the paper's setting) or ``γ²λ²/C²`` from ``--lr γ``
and ``--lam λ``. The logits are then ≈ 0, ŷ ≈ uniform, and the energy of the
estimates is at its floor 1/C (eqs. 13–17): the noise fraction falls to
1/(C−1) and the cross-entropy is ln C. ``--feature-norm`` first puts ENTAME's
parameter-free z-normalisation (eq. 20, :class:`ftdoctor.featurenorm.FeatureNorm`)
in front of the head, its eval statistics initialised from the data.

Verified on the data with the ``noise`` probe: ``cross_entropy`` within 1e-3
of ln C and ``noise_fraction`` within 1e-3 of 1/(C−1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.featurenorm import insert_feature_norm
from ftdoctor.fixes.base import Check, Fix, FixContext, FixOutcome, layer_keys, register_fix, within
from ftdoctor.fixes.passes import input_statistics
from ftdoctor.heads import ENTAME_PHI_W, entame_phi_w, generator_for, init_head_
from ftdoctor.model import AffineLayer
from ftdoctor.probes.noise import TRAINED_LABEL_FIT

TOLERANCE = 1e-3
NOISE_KEYS = ("noise_fraction", "excess_noise_fraction", "max_entropy_noise_fraction", "cross_entropy",
              "max_entropy_loss", "estimate_energy", "correct_prob", "label_fit", "backbone_error_energy",
              "feature_energy")


@dataclass(frozen=True)
class EntameOptions:
    """``--phi-w`` or ``--lr``/``--lam`` (eq. 21), and ``--feature-norm`` (eq. 20)."""

    phi_w: float | None = None
    lr: float | None = None
    lam: float | None = None
    feature_norm: bool = False
    eps: float = 1e-5

    def validate(self) -> None:
        if self.phi_w is not None and (self.lr is not None or self.lam is not None):
            raise FtdoctorError("--phi-w and --lr/--lam both set the head's variance",
                                "pass either --phi-w or --lr with --lam")
        if (self.lr is None) != (self.lam is None):
            raise FtdoctorError("--lr and --lam go together (φ_w = γ²λ²/C², ENTAME eq. 21)",
                                "pass both --lr and --lam, or --phi-w")
        for flag, value in (("--phi-w", self.phi_w), ("--lr", self.lr), ("--lam", self.lam)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise FtdoctorError(f"{flag} must be a positive number, got {value}", "e.g. --phi-w 1e-12")

    def resolved_phi_w(self, num_classes: int) -> float:
        if self.phi_w is not None:
            return self.phi_w
        if self.lr is not None and self.lam is not None:
            return entame_phi_w(self.lr, self.lam, num_classes)
        return ENTAME_PHI_W


def noise_figures(ctx: FixContext, head: AffineLayer, layers: list[AffineLayer], description: str) -> dict[str, Any]:
    """The ``noise`` probe's figures (SPEC §1.1) for the model as it is now."""
    from ftdoctor.diagnose import ProbeOptions, probe_model
    run = probe_model(ctx.model, ctx.data, ProbeOptions(probes=("noise",), head=head.name, seed=ctx.seed),
                      device=ctx.device, layers=layers, description=description)
    return run.results["noise"].figures


@dataclass
class _Applied:
    phi_w: float
    head: AffineLayer
    layers: list[AffineLayer]
    feature_norm: bool


@register_fix(name="entame", options_type=EntameOptions, paper="Varno et al. 2019 (ENTAME), §5, eqs. 20–21, Table 1",
              summary="ENTAME §5: maximum-entropy head W ~ N(0, φ_w), b = 0 (eq. 21), optionally behind the "
                      "parameter-free feature norm (eq. 20); the noise fraction falls to its floor 1/(C−1)",
              priority=10)
class Entame(Fix[EntameOptions]):
    def validate(self, ctx: FixContext) -> None:
        super().validate(ctx)
        if self.options.feature_norm and not isinstance(ctx.head.module, nn.Linear):
            raise FtdoctorError(f"--feature-norm needs a Linear head, but {ctx.head.name} is a {ctx.head.kind}",
                                "drop --feature-norm, or pass --new-head to attach a Linear head")

    def before(self, ctx: FixContext) -> dict[str, Any]:
        return noise_figures(ctx, ctx.head, list(ctx.layers), "noise (before)")

    def apply(self, ctx: FixContext, before: Any) -> _Applied:
        opts = self.options
        phi_w = opts.resolved_phi_w(ctx.num_classes)
        module = ctx.head.module
        if opts.feature_norm:
            mean, var = input_statistics(ctx.model, ctx.data, module, ctx.device)
            module = insert_feature_norm(ctx.model, ctx.head.name, opts.eps)
            module.feature_norm.set_statistics(mean, var)
        init_head_(module, "entame", generator_for(ctx.seed), phi_w=phi_w)
        head = AffineLayer(ctx.head.name, module)
        layers = [head if l.name == head.name else l for l in ctx.layers]
        return _Applied(phi_w=phi_w, head=head, layers=layers, feature_norm=opts.feature_norm)

    def verify(self, ctx: FixContext, before: dict[str, Any], applied: _Applied) -> FixOutcome:
        after = noise_figures(ctx, applied.head, applied.layers, "noise (after)")
        c = ctx.num_classes
        floor = 1.0 / (c - 1) if c > 1 else None
        ln_c = math.log(c)
        checks = [
            Check("cross_entropy", before=before.get("cross_entropy"), after=after.get("cross_entropy"),
                  target=f"ln C = {ln_c:.6f} ± {TOLERANCE:g}",
                  passed=within(after.get("cross_entropy"), ln_c, TOLERANCE)),
            Check("noise_fraction", before=before.get("noise_fraction"), after=after.get("noise_fraction"),
                  target=(f"1/(C−1) = {floor:.6f} ± {TOLERANCE:g}" if floor is not None else "n/a"),
                  passed=floor is not None and within(after.get("noise_fraction"), floor, TOLERANCE)),
            Check("excess_noise_fraction", before=before.get("excess_noise_fraction"),
                  after=after.get("excess_noise_fraction"), target="0"),
        ]
        notes = []
        fit = before.get("label_fit")
        if fit is not None and fit >= TRAINED_LABEL_FIT:
            notes.append(f"warning: the head {ctx.head.name} predicted these labels (label fit {fit:.3g}, correct-class "
                         f"probability {before.get('correct_prob'):.3g}); ENTAME replaced it with a maximum-entropy "
                         "head, discarding what it had learned. That is right at the start of a fine-tune on a new "
                         "task (--new-head); to keep a trained head, do not apply entame to it")
        if applied.feature_norm:
            notes.append(f"{applied.head.name} is now a FeatureNormLinear: its input is z-normalised "
                         f"(ENTAME eq. 20; buffers {applied.head.name}.feature_norm.mean/.var, set from the data). "
                         "A state dict gets those two extra keys: load it with ftdoctor, or call "
                         "ftdoctor.featurenorm.attach_feature_norms(model, state) before model.load_state_dict(state)")
        return FixOutcome(
            parameters={"phi_w": applied.phi_w, "lr": self.options.lr, "lam": self.options.lam,
                        "feature_norm": applied.feature_norm,
                        "eps": self.options.eps if applied.feature_norm else None},
            checks=checks, changes=layer_keys(ctx.model, [applied.head.name]),
            figures={"noise_before": {k: before.get(k) for k in NOISE_KEYS},
                     "noise_after": {k: after.get(k) for k in NOISE_KEYS}},
            notes=notes)
