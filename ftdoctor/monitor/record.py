"""A monitored run as an HDF5 file in ``trace``'s layout, so ``ftdoctor plot run.h5 -o run.html`` draws it.

The run is one series (``runs/<name>/seed_<seed>``, SPEC §3 trace layout) over its measuring steps: the
cross-entropy and accuracy of the step's batches, the head's learning rate, the variance of the head's
input (ENTAME Fig. 1), the noise fraction ζ/φ (Table 1), the L2-SP distance Σ‖W − W⁰‖² and every measured
layer's gradient norm (RIFLE Fig. 2); RIFLE's re-initialisations mark the steps they happened at. The
accuracy curve is the framework's evaluation when it reports one (``eval_accuracy``), else the accuracy on
the measured training batches — the report's ``data.eval_split`` says which. Beside the trace series the
file holds the other scalars the monitor logs (``r2_median``, ``depth_ratio``, ``change_rate_spread``, …),
one value per measuring step. Written atomically after every measurement: a run that dies keeps its file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftdoctor.dynamics.series import RunSeries, TraceResult
from ftdoctor.monitor.core import Measurement
from ftdoctor.report.content import MEASURED_BATCHES

#: the scalars kept beside the trace series, by their dataset name
EXTRA = ("excess_noise_fraction", "change_rate_spread", "change_rate_cv", "depth_ratio", "r2_median", "drift")


def _nan(v: float | None) -> float:
    return float(v) if v is not None and math.isfinite(v) else float("nan")


@dataclass
class RunRecord:
    """What a callback keeps of the run for its HDF5 file (see the module doc)."""

    path: Path
    name: str = "monitor"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    evaluations: list[tuple[int, float]] = field(default_factory=list)   # (step, accuracy) of the framework
    reinitialised: list[int] = field(default_factory=list)

    def series(self, history: Sequence[Measurement]) -> tuple[RunSeries, dict[str, np.ndarray]]:
        layers: list[str] = []
        for m in history:
            for row in m.figures.get("grad_norm", {}).get("layers", []):
                if row["name"] not in layers:
                    layers.append(row["name"])
        head = next((m.figures["grad_norm"].get("head") for m in history if "grad_norm" in m.figures), "")
        grad = np.full((len(history), len(layers)), np.nan)
        for i, m in enumerate(history):
            norms = m.layer_series("grad_norm", "grad_norm")
            for j, name in enumerate(layers):
                grad[i, j] = _nan(norms.get(name))
        step = np.asarray([m.step for m in history], dtype=np.int64)
        if self.evaluations:
            ev_step = np.asarray([s for s, _ in self.evaluations], dtype=np.int64)
            ev_acc = np.asarray([a for _, a in self.evaluations], dtype=np.float64)
        else:
            ev_step, ev_acc = step.copy(), np.asarray([_nan(m.accuracy) for m in history])
        noise = [m.figures.get("noise", {}) for m in history]
        run = RunSeries(
            method=self.name, seed=self.seed, head=head, layers=tuple(layers), step=step,
            loss=np.asarray([_nan(m.loss) for m in history]),
            train_acc=np.asarray([_nan(m.accuracy) for m in history]),
            lr=np.asarray([_nan(m.lr) for m in history]), backbone_lr=np.asarray([_nan(m.lr) for m in history]),
            feature_var=np.asarray([_nan(m.feature_var) for m in history]),
            noise_fraction=np.asarray([_nan(n.get("noise_fraction")) for n in noise]),
            sp_penalty=np.asarray([_nan(m.scalars.get("ftdoctor/sp_penalty")) for m in history]),
            grad_norm=grad, eval_step=ev_step, eval_acc=ev_acc, start_digest="", batch_digest="",
            reinitialised=tuple(self.reinitialised))
        extra = {f"runs/{self.name}/seed_{self.seed}/{k}":
                 np.asarray([_nan(m.scalars.get(f"ftdoctor/{k}")) for m in history]) for k in EXTRA}
        return run, extra

    def write(self, history: Sequence[Measurement]) -> Path | None:
        """The file as of now (atomic); None when nothing was measured yet."""
        if not history:
            return None
        from ftdoctor.report import hdf5
        run, extra = self.series(history)
        classes = next((m.figures["noise"].get("max_entropy_noise_fraction") for m in history
                        if "noise" in m.figures), None)
        num_classes = round(1 + 1 / classes) if classes else None
        data = {"name": "the run's own batches", "num_classes": num_classes,
                "eval_split": "the framework's evaluation" if self.evaluations else MEASURED_BATCHES,
                "eval_samples": history[-1].examples}
        settings = {"source": "ftdoctor.monitor", "window": 10, "steps": int(history[-1].step) + 1,
                    **self.settings}
        result = TraceResult(model=self.model, data=data, settings=settings, run=run,
                             notes=tuple(dict.fromkeys(n for m in history for n in m.notes)))
        arrays = {**run.arrays(), **extra}
        hdf5.write(self.path, "ftdoctor.trace/1", result.to_json(), arrays, run.attrs())
        return self.path

