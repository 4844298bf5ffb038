"""``datadep`` — Krähenbühl et al.'s within-layer initialisation (§3.1, Alg. 1).

For every selected affine layer, in forward order (each sees the layers
before it already re-initialised): draw ``W ~ N(0, I)``, ``b = 0``; pass the
data through and take every output channel's mean ``μ̂_i`` and std ``σ̂_i``
(over examples and positions); then ``W_i /= σ̂_i`` and ``b_i = β − μ̂_i/σ̂_i``
so that each channel has mean β and unit variance on the data. ``--layers
GLOB[,GLOB]`` selects layers by qualified name (default: the head),
``--beta`` sets β (default 0).

A channel whose output is constant on the data (σ̂ = 0, e.g. behind a dead
ReLU) cannot be normalised: it keeps its draw and is reported; a layer
without a bias cannot be centred, so only its scale is set.

Verified: channel means ≈ β and stds ≈ 1 on the data (within 1e-3).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch

from ftdoctor.errors import FtdoctorError
from ftdoctor.fixes.base import Check, Fix, FixContext, FixOutcome, LeftAlone, layer_keys, register_fix
from ftdoctor.fixes.passes import ChannelStats, output_channel_stats
from ftdoctor.model import AffineLayer

TOLERANCE = 1e-3
_CONSTANT = 1e-12


@dataclass(frozen=True)
class DatadepOptions:
    """``--layers GLOB,...`` (default: the head) and ``--beta``."""

    layers: tuple[str, ...] | None = None
    beta: float = 0.0


def select_layers(layers: tuple[AffineLayer, ...], head: AffineLayer,
                  patterns: tuple[str, ...] | None) -> list[AffineLayer]:
    if not patterns:
        return [head]
    chosen = [l for l in layers if any(fnmatch.fnmatchcase(l.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(l.name for l in layers[:8])
        raise FtdoctorError(f"--layers {','.join(patterns)} matches no affine layer",
                            f"use glob(s) over the affine layers' names, e.g. {names}")
    return chosen


@dataclass
class _Applied:
    layers: list[AffineLayer]
    constant: dict[str, int]
    unbiased: list[str]


@register_fix(name="datadep", options_type=DatadepOptions, paper="Krähenbühl et al. 2016, §3.1, Alg. 1",
              summary="Krähenbühl et al. §3.1 (Alg. 1): re-draw the chosen layers (default the head) so every "
                      "output channel has mean β and unit variance on the data", priority=40)
class Datadep(Fix[DatadepOptions]):
    def validate(self, ctx: FixContext) -> None:
        select_layers(ctx.layers, ctx.head, self.options.layers)

    def _stats(self, ctx: FixContext, layers: list[AffineLayer], description: str) -> dict[str, ChannelStats]:
        return output_channel_stats(ctx.model, ctx.data, {l.name: l.module for l in layers}, ctx.device,
                                    description)

    def before(self, ctx: FixContext) -> dict[str, ChannelStats]:
        return self._stats(ctx, select_layers(ctx.layers, ctx.head, self.options.layers), "channel statistics (before)")

    @torch.no_grad()
    def apply(self, ctx: FixContext, before: Any) -> _Applied:
        beta = float(self.options.beta)
        chosen = select_layers(ctx.layers, ctx.head, self.options.layers)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        constant: dict[str, int] = {}
        unbiased: list[str] = []
        for layer in chosen:
            w = layer.weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w))
            if layer.bias is not None:
                layer.bias.zero_()
            else:
                unbiased.append(layer.name)
            stats = self._stats(ctx, [layer], f"datadep {layer.name}")[layer.name]
            sigma, mu = stats.std, stats.mean
            dead = sigma <= _CONSTANT
            constant[layer.name] = int(dead.sum())
            scale = torch.where(dead, torch.ones_like(sigma), sigma)
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.copy_((w.to(torch.float64) / scale.to(w.device).reshape(shape)).to(w))
            if layer.bias is not None:
                layer.bias.copy_((beta - mu / scale).to(layer.bias))
        return _Applied(layers=chosen, constant=constant, unbiased=unbiased)

    def verify(self, ctx: FixContext, before: dict[str, ChannelStats], applied: _Applied) -> FixOutcome:
        beta = float(self.options.beta)
        after = self._stats(ctx, applied.layers, "channel statistics (after)")
        checks: list[Check] = []
        rows = []
        left: list[LeftAlone] = []
        for layer in applied.layers:
            a, b = after[layer.name], before[layer.name]
            live = a.std > _CONSTANT if applied.constant.get(layer.name) else torch.ones_like(a.std, dtype=torch.bool)
            mean_err = float((a.mean[live] - beta).abs().max()) if bool(live.any()) else 0.0
            std_err = float((a.std[live] - 1.0).abs().max()) if bool(live.any()) else 0.0
            centred = layer.name not in applied.unbiased
            checks.append(Check(f"{layer.name}: max |std − 1|", after=std_err,
                                before=float((b.std - 1.0).abs().max()), target=f"≤ {TOLERANCE:g}",
                                passed=std_err <= TOLERANCE))
            checks.append(Check(f"{layer.name}: max |mean − β|", after=mean_err,
                                before=float((b.mean - beta).abs().max()),
                                target=f"≤ {TOLERANCE:g}" if centred else "(no bias: not centred)",
                                passed=(mean_err <= TOLERANCE) if centred else None))
            rows.append({"name": layer.name, "kind": layer.kind, "channels": int(a.mean.numel()),
                         "mean_before": float(b.mean.mean()), "std_before": float(b.std.mean()),
                         "mean_after": float(a.mean.mean()), "std_after": float(a.std.mean()),
                         "max_abs_mean_error": mean_err, "max_abs_std_error": std_err,
                         "constant_channels": applied.constant.get(layer.name, 0)})
            if applied.constant.get(layer.name):
                left.append(LeftAlone(layer.name, f"{applied.constant[layer.name]} channel(s) are constant on the "
                                                  "data (σ̂ = 0) and could not be normalised"))
            if not centred:
                left.append(LeftAlone(layer.name, "has no bias, so its channels were scaled but not centred"))
        return FixOutcome(
            parameters={"layers": [l.name for l in applied.layers],
                        "patterns": list(self.options.layers) if self.options.layers else None,
                        "beta": beta},
            checks=checks, changes=layer_keys(ctx.model, [l.name for l in applied.layers]),
            figures={"layers": rows}, left_alone=left)
