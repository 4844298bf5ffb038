"""``rifle`` — re-initialise the head (RIFLE, Li et al. 2020, Alg. 1).

RIFLE re-draws the fully connected head so that the backbone keeps receiving
meaningful gradients ("deep" gradients, §4.6.1, Fig. 2). ``--init
torch-default`` draws what ``reset_parameters()`` draws (``U(±1/sqrt(fan_in))``
for weight and bias, as the authors' PyTorch code re-initialises);
``kaiming-normal`` draws ``N(0, 2/fan_in)`` with a zero bias. ``--seed`` fixes
the draw.

Verified: the head changed, and every other tensor is bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ftdoctor.errors import FtdoctorError
from ftdoctor.fixes.base import Check, Fix, FixContext, FixOutcome, changed_keys, layer_keys, register_fix, snapshot
from ftdoctor.heads import generator_for, init_head_

INITS = ("torch-default", "kaiming-normal")


@dataclass(frozen=True)
class RifleOptions:
    """``--init torch-default|kaiming-normal``."""

    init: str = "torch-default"

    def validate(self) -> None:
        if self.init not in INITS:
            raise FtdoctorError(f"unknown --init {self.init!r}", f"use one of {', '.join(INITS)}")


@register_fix(name="rifle", options_type=RifleOptions, paper="Li et al. 2020 (RIFLE), Alg. 1, §4.6.1",
              summary="RIFLE Alg. 1: re-initialise the head (torch-default or kaiming-normal); the backbone is "
                      "untouched", priority=20)
class Rifle(Fix[RifleOptions]):
    def before(self, ctx: FixContext) -> dict[str, torch.Tensor]:
        return snapshot(ctx.model)

    def apply(self, ctx: FixContext, before: Any) -> None:
        init_head_(ctx.head.module, self.options.init, generator_for(ctx.seed, "rifle"))

    def verify(self, ctx: FixContext, before: dict[str, torch.Tensor], applied: Any) -> FixOutcome:
        after = snapshot(ctx.model)
        head_keys = layer_keys(ctx.model, [ctx.head.name])
        changed = changed_keys(before, after)
        w_key = f"{ctx.head.name}.weight"
        others = [k for k in after if k not in head_keys]
        identical = [k for k in others if k not in changed]
        w_before = before.get(w_key)
        checks = [
            Check("head_changed", after=float(w_key in changed), target="head weight re-drawn",
                  passed=w_key in changed),
            Check("other_tensors_identical", after=float(len(identical)), before=float(len(others)),
                  target=f"all {len(others)} bit-identical", passed=len(identical) == len(others)),
            Check("head_weight_norm", before=None if w_before is None else float(w_before.norm()),
                  after=float(after[w_key].norm())),
        ]
        return FixOutcome(parameters={"init": self.options.init}, checks=checks, changes=head_keys,
                          figures={"head": ctx.head.name, "tensors_identical": len(identical),
                                   "tensors_other": len(others)})
