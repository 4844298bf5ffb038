"""Passes over the data that the fixes need besides the probes: statistics and logit comparisons.

Every pass runs the model in eval mode under ``no_grad`` and leaves the train
flags as they were; accumulators are per channel (float64), never per example.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ftdoctor import progress
from ftdoctor.featurenorm import feature_statistics
from ftdoctor import forward
from ftdoctor.model import restore_modes, training_modes


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the pass; every module's flag restored after."""
    modes = training_modes(*models)
    try:
        for model in models:
            model.eval()
        yield
    finally:
        restore_modes(modes)


class Subset:
    """The first ``n`` examples of a data bundle, with the bundle's interface (same example indices)."""

    def __init__(self, bundle: Any, n: int) -> None:
        self._bundle = bundle
        self.num_samples = min(int(n), int(bundle.num_samples))
        self.num_classes = bundle.num_classes
        self.name = getattr(bundle, "name", "data")
        self.split = getattr(bundle, "split", "train")
        self.notes = list(getattr(bundle, "notes", []))

    @property
    def dataset(self) -> Any:
        return self._bundle.dataset

    def loader(self, batch_size: int | None = None, shuffle: bool = False, seed: int = 0, sampler: Any = None,
               drop_last: bool = False) -> Any:
        if sampler is None:
            sampler = range(self.num_samples)
        return self._bundle.loader(batch_size=batch_size, shuffle=False, seed=seed, sampler=sampler,
                                   drop_last=drop_last)


def subset(bundle: Any, n: int | None) -> Any:
    """``bundle`` limited to its first ``n`` examples (``bundle`` itself when n is None or large)."""
    if n is None or n >= bundle.num_samples:
        return bundle
    return Subset(bundle, n)


@torch.no_grad()
def max_logit_change(reference: nn.Module, model: nn.Module, data: Any,
                     device: torch.device | str = "cpu") -> tuple[float | None, float]:
    """(max |Δlogit| / max |logit|, max |Δlogit|) between two models over the data, streamed."""
    diff, scale = 0.0, 0.0
    with evaluating(reference, model), progress.task("checking logits", data.num_samples, "examples") as bar:
        for x, _, _ in data.loader():
            x = x.to(device)
            a = forward.logits(reference, x).to(torch.float64)
            b = forward.logits(model, x).to(torch.float64)
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            bar.advance(int(x.shape[0]))
    if scale == 0.0:
        return (0.0 if diff == 0.0 else None), diff
    return diff / scale, diff


def channel_dim(module: nn.Module) -> int:
    """The output-channel dimension of an affine layer's output: 1 for convolutions, -1 for Linear."""
    return -1 if isinstance(module, nn.Linear) or getattr(module, "original_name", "") == "Linear" else 1


@dataclass(frozen=True)
class ChannelStats:
    """Per-output-channel mean and (population) std of a layer's output over the data."""

    mean: Tensor
    std: Tensor


@torch.no_grad()
def output_channel_stats(model: nn.Module, data: Any, modules: dict[str, nn.Module],
                         device: torch.device | str = "cpu",
                         description: str = "channel statistics") -> dict[str, ChannelStats]:
    """One pass: the mean and std of every output channel of ``modules`` (pooled over examples and positions)."""
    sums: dict[str, list[Tensor]] = {}

    def hook_for(name: str, module: nn.Module):
        dim = channel_dim(module)

        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            z = out.detach().to(torch.float64).movedim(dim, -1)
            z = z.reshape(-1, z.shape[-1])
            s, s2, n = z.sum(0), (z * z).sum(0), z.shape[0]
            if name in sums:
                sums[name][0] += s
                sums[name][1] += s2
                sums[name][2] += n
            else:
                sums[name] = [s, s2, torch.tensor(float(n), dtype=torch.float64)]
        return hook

    handles = [m.register_forward_hook(hook_for(n, m)) for n, m in modules.items()]
    try:
        with evaluating(model), progress.task(description, data.num_samples, "examples") as bar:
            for x, _, _ in data.loader():
                forward.logits(model, forward.to_device(x, device))
                bar.advance(int(x.shape[0]))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s, s2, n) in sums.items():
        mean = s / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        out[name] = ChannelStats(mean=mean.cpu(), std=var.sqrt().cpu())
    return out


@torch.no_grad()
def input_statistics(model: nn.Module, data: Any, module: nn.Module,
                     device: torch.device | str = "cpu", *, raw: bool = False) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population variance (float64) of ``module``'s input over the data (``raw``: of
    what reaches it before its own pre-hooks run, e.g. a ``FeatureNormLinear``'s normalisation)."""
    captured: list[Tensor] = []
    if raw:
        handle = module.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()), prepend=True)
    else:
        handle = module.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))

    def features() -> Iterator[Tensor]:
        with evaluating(model), progress.task("feature statistics", data.num_samples, "examples") as bar:
            for x, _, _ in data.loader():
                captured.clear()
                forward.logits(model, forward.to_device(x, device))
                bar.advance(int(x.shape[0]))
                yield from captured

    try:
        return feature_statistics(features())
    finally:
        handle.remove()
