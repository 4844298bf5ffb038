"""What fine-tuning runs record and report: the series of one run, a trace, a comparison (ENTAME Table 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

import ftdoctor
from ftdoctor.dynamics.options import COMPARE_SCHEMA, SCHEMA, SERIES
from ftdoctor.errors import FtdoctorError
from ftdoctor.stats import ci95_half_width, mean, paired_t_test


@dataclass(frozen=True)
class RunSeries:
    """The recorded dynamics of one method × seed (SPEC §3 trace layout)."""

    method: str
    seed: int
    head: str
    layers: tuple[str, ...]            # affine layers in forward order, the head last
    step: np.ndarray
    loss: np.ndarray
    train_acc: np.ndarray
    lr: np.ndarray
    backbone_lr: np.ndarray
    feature_var: np.ndarray
    noise_fraction: np.ndarray
    sp_penalty: np.ndarray
    grad_norm: np.ndarray              # steps × layers
    eval_step: np.ndarray
    eval_acc: np.ndarray
    start_digest: str                  # sha256 of the backbone's starting tensors
    batch_digest: str                  # sha256 of the example indices consumed, in order
    reinitialised: tuple[int, ...] = ()  # rifle: the head was re-drawn after these many steps

    def early_acc(self, window: int) -> float:
        """Mean evaluation accuracy after steps 1 … ``window`` (ENTAME Table 3)."""
        sel = (self.eval_step >= 1) & (self.eval_step <= window)
        return float(np.mean(self.eval_acc[sel])) if sel.any() else float(self.eval_acc[-1])

    @property
    def final_acc(self) -> float:
        return float(self.eval_acc[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        prefix = f"runs/{self.method}/seed_{self.seed}"
        names = SERIES + ("backbone_lr", "sp_penalty")
        return {f"{prefix}/{n}": getattr(self, n) for n in names}

    def attrs(self) -> dict[str, dict[str, Any]]:
        prefix = f"runs/{self.method}/seed_{self.seed}"
        return {f"{prefix}/grad_norm": {"layers": list(self.layers), "head": self.head},
                f"{prefix}/step": {"start_digest": self.start_digest, "batch_digest": self.batch_digest,
                                   "reinitialised": np.asarray(self.reinitialised, dtype=np.int64)}}

    def final(self, window: int) -> dict[str, Any]:
        return {"loss": _num(self.loss[-1]), "train_acc": _num(self.train_acc[-1]),
                "eval_acc": _num(self.final_acc), "early_acc": _num(self.early_acc(window)),
                "feature_var": _num(self.feature_var[-1]), "noise_fraction": _num(self.noise_fraction[-1]),
                "sp_penalty": _num(self.sp_penalty[-1]),
                "grad_norm": [{"name": n, "grad_norm": _num(g)} for n, g in zip(self.layers, self.grad_norm[-1])],
                "reinitialised": list(self.reinitialised)}


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Described:
    """The ``model``, ``data`` and ``settings`` blocks every fine-tuning report starts with."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class TraceResult(Described):
    """One ``trace`` run: the series, the settings and where it came from."""

    run: RunSeries
    notes: tuple[str, ...] = ()
    kind: ClassVar[str] = "trace"

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ftdoctor_version": ftdoctor.__version__,
                "torch_version": torch.__version__.split("+")[0], "model": self.model, "data": self.data,
                "settings": self.settings, "method": self.run.method, "seed": self.run.seed,
                "steps": int(len(self.run.step)), "final": self.run.final(self.settings["window"])}

    def arrays(self) -> dict[str, np.ndarray]:
        return self.run.arrays()

    def attrs(self) -> dict[str, dict[str, Any]]:
        return self.run.attrs()


@dataclass(frozen=True)
class MethodSummary:
    """One row of the ENTAME Table 3 view."""

    name: str
    early_acc: tuple[float, ...]        # per seed
    final_acc: tuple[float, ...]
    early_acc_mean: float
    early_acc_ci95: float | None
    final_acc_mean: float
    final_acc_ci95: float | None
    diff_vs_first: float | None
    diff_ci95: float | None
    p_value: float | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "early_acc_mean": self.early_acc_mean, "early_acc_ci95": self.early_acc_ci95,
                "final_acc_mean": self.final_acc_mean, "final_acc_ci95": self.final_acc_ci95,
                "diff_vs_first": self.diff_vs_first, "diff_ci95": self.diff_ci95, "p_value": self.p_value}


@dataclass(frozen=True)
class CompareResult(Described):
    """Methods × seeds from identical starts and batches, summarised as ENTAME Table 3."""

    window: int
    steps: int
    seeds: tuple[int, ...]
    methods: tuple[MethodSummary, ...]
    runs: tuple[RunSeries, ...]
    notes: tuple[str, ...] = ()
    kind: ClassVar[str] = "compare"

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMPARE_SCHEMA, "ftdoctor_version": ftdoctor.__version__,
                "torch_version": torch.__version__.split("+")[0], "window": self.window, "steps": self.steps,
                "seeds": len(self.seeds), "seed_values": list(self.seeds), "model": self.model,
                "data": self.data, "settings": self.settings, "methods": [m.to_json() for m in self.methods]}

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for r in self.runs:
            out.update(r.arrays())
        return out

    def attrs(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            out.update(r.attrs())
        return out


def summarise(runs: Sequence[RunSeries], methods: Sequence[str], window: int) -> tuple[MethodSummary, ...]:
    """Per method: mean early and final accuracy ± 95% CI over seeds; paired difference to the first."""
    by = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.seed) for m in methods}
    first = [r.early_acc(window) for r in by[methods[0]]]
    rows = []
    for i, m in enumerate(methods):
        early = [r.early_acc(window) for r in by[m]]
        final = [r.final_acc for r in by[m]]
        d = half = p = None
        if i > 0:
            d, half, p = paired_t_test(early, first)
        rows.append(MethodSummary(name=m, early_acc=tuple(early), final_acc=tuple(final),
                                  early_acc_mean=mean(early), early_acc_ci95=ci95_half_width(early),
                                  final_acc_mean=mean(final), final_acc_ci95=ci95_half_width(final),
                                  diff_vs_first=d, diff_ci95=half, p_value=p))
    return tuple(rows)


def check_paired(runs: Sequence[RunSeries]) -> None:
    """Every method of a seed must have started from the same backbone and consumed the same batches."""
    by_seed: dict[int, list[RunSeries]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    for s, rs in by_seed.items():
        if len({r.start_digest for r in rs}) > 1 or len({r.batch_digest for r in rs}) > 1:
            raise FtdoctorError(f"seed {s}: the methods did not start from identical backbones and batches",
                                "this is a bug in ftdoctor; rerun with --debug and report it")
