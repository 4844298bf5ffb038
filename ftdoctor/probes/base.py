"""The probe plug-in interface and its registry.

A probe is a set of sufficient statistics that add up (the torchmetrics
``add_state(..., dist_reduce_fx="sum")`` pattern): ``update`` folds one batch
in, ``compute`` turns the sums into figures. Because every state is a sum (or
a list of per-batch values), the engine can merge probes across processes
without any probe knowing about distribution. Adding a probe is adding one
module that defines a :class:`Probe` subclass decorated with
:func:`register_probe`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ftdoctor.engine.batch import Batch
from ftdoctor.engine.sums import Float64Sum
from ftdoctor.model import AffineLayer
from ftdoctor.registry import Registry
from ftdoctor.probes.verdicts import PLACEHOLDERS, RunArgs, Suggestion, Verdict, render

PROBES = Registry("probe")
#: class decorator: make a probe available to ``probe --probes`` and ``check``
register_probe = PROBES.register


@dataclass(frozen=True)
class Skipped:
    """Something a probe could not measure, and why (reported, never silent)."""

    name: str
    probe: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "probe": self.probe, "reason": self.reason}


@dataclass(frozen=True)
class Finding:
    """A diagnosis in words (SPEC §1.6); the suggestion is a :class:`Suggestion`, rendered at the edge."""

    probe: str
    severity: str  # info | warning | error
    message: str
    suggestion: Suggestion | None = None

    def to_json(self, run: RunArgs = PLACEHOLDERS) -> dict[str, str | None]:
        return {"probe": self.probe, "severity": self.severity, "message": self.message,
                "suggestion": render(self.suggestion, run)}


class Figures:
    """Base of a probe's figures: a frozen dataclass whose :meth:`to_json` is its block of the report.

    Item access reads that block (``figures["spread"]``, ``figures.get("layers")``), for code and tests that
    work on the JSON view.
    """

    def to_json(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define to_json(): its block of the report")

    def _view(self) -> dict[str, Any]:
        """The JSON block, built once (figures are frozen): ``judge()`` reads many keys of it; treat as
        read-only (:meth:`to_json` gives a fresh copy)."""
        view = self.__dict__.get("_json_view")
        if view is None:
            view = self.to_json()
            object.__setattr__(self, "_json_view", view)
        return view

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._view().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._view()

    def keys(self) -> Any:
        return self._view().keys()


def row_json(row: Any) -> dict[str, Any]:
    """A per-layer row (a frozen dataclass) as a JSON object, fields in declaration order."""
    return {f.name: getattr(row, f.name) for f in fields(row)}


@dataclass(frozen=True)
class ProbeResult:
    """What a probe computed: its figures, plus arrays (and their attributes) for the HDF5 file."""

    figures: Figures
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    array_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """A column a probe adds to the per-layer table: header, the row key, and whether it gets a log bar."""

    header: str
    key: str
    bar: bool = False


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may know about the run, fixed before the pass starts."""

    model: nn.Module
    layers: tuple[AffineLayer, ...]   # affine layers in forward order
    head: AffineLayer
    num_classes: int
    seed: int
    reference: nn.Module | None = None
    reference_layers: tuple[tuple[AffineLayer, AffineLayer], ...] = ()  # (model, reference) pairs
    scripted: bool = False            # a TorchScript model: no Python hooks run inside it
    new_head: bool = False            # the head is a fresh one (--new-head)
    head_init: str = "kaiming"        # how fresh heads are drawn
    seeds: int = 1                    # fresh heads to average over (--seeds, with --new-head)
    change_rate_mode: str = "exact"   # exact | batch | totals (no cv: the live monitor)
    change_rate_loss: str = "random"  # random | ce
    measured: tuple[AffineLayer, ...] = ()   # layers plus embeddings and norms, forward order (measures_norms)

    @property
    def measured_layers(self) -> tuple[AffineLayer, ...]:
        """What a probe with ``measures_norms`` measures: ``measured``, or the affine layers alone."""
        return self.measured or self.layers


class Probe:
    """Base class: declare states with :meth:`add_state`, then update/compute."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    # What the engine must measure per batch for this probe:
    #   "head_input", "ce_grads", "rand_grads", "grad_sq", "outputs"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: also measure embeddings and normalisation layers (``ProbeContext.measured_layers``), not only affine ones
    measures_norms: ClassVar[bool] = False

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self._states: dict[str, str] = {}
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []

    def unavailable(self) -> str | None:
        """Why this probe cannot measure this model at all (then it is reported as skipped), or None."""
        return None

    # -- optional hooks the engine offers the probe that asked for "grad_sq" / "outputs" -------------
    def grad_sq_sink(self, name: str, dtype: torch.dtype) -> Tensor | None:
        """A running sum the engine may add layer ``name``'s per-example squares into, in place (then
        ``Batch.grad_sq[name]`` is that very tensor); None to be handed a fresh tensor."""
        return None

    def take_pair(self, name: str, mine: Tensor, ref: Tensor) -> bool:
        """Reduce layer ``name``'s (model, reference) outputs during the reference's forward, before any
        in-place op after the layer; True when taken (then neither is kept for ``update``)."""
        return False

    # -- state management (mergeable sufficient statistics) -----------------
    def add_state(self, name: str, default: Tensor | list | Float64Sum, reduce: str = "sum") -> None:
        """Declare a state.

        ``sum``: a float64 tensor (or :class:`Float64Sum`) of this process's examples, summed across
        processes at the end; ``replicated``: built from per-batch quantities that were already
        all-reduced (identical on every process, so never summed again); ``cat``: a list of such
        per-batch values.
        """
        if reduce not in ("sum", "replicated", "cat"):
            raise ValueError(reduce)
        self._states[name] = reduce
        if isinstance(default, Float64Sum):
            setattr(self, name, default)
        else:
            setattr(self, name, default.clone() if isinstance(default, Tensor) else list(default))

    def state_names(self) -> dict[str, str]:
        return dict(self._states)

    def state(self, name: str) -> Tensor | list:
        """A state's current value (a :class:`Float64Sum` folded into its float64 total)."""
        value = getattr(self, name)
        return value.value() if isinstance(value, Float64Sum) else value

    def merge_(self, other: "Probe") -> None:
        """Fold another process's probe into this one (what the final all-reduce does)."""
        for name, reduce in self._states.items():
            if reduce == "sum":
                setattr(self, name, self.state(name) + other.state(name))

    def reduce_(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum every ``sum`` state across processes with ``all_reduce``."""
        for name, reduce in self._states.items():
            if reduce == "sum":
                setattr(self, name, all_reduce(self.state(name)))

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skipped(name, self.name, reason))

    # -- the template methods: measuring ------------------------------------
    def update(self, batch: Batch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"probe {self.name!r} must define update(batch)")

    def compute(self) -> ProbeResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"probe {self.name!r} must define compute()")

    # -- the science around the figures (class methods: they need only the figures) ---------------
    #: the ``check`` threshold keys :meth:`judge` decides, in report order
    thresholds: ClassVar[tuple[str, ...]] = ()
    #: its columns of the per-layer table (``figures["layers"]`` rows, matched by ``name``)
    columns: ClassVar[tuple[Column, ...]] = ()

    @classmethod
    def judge(cls, figures: Figures, thresholds: Any) -> list[Verdict]:
        """The probe's one judgement rule: a :class:`Verdict` per key of :attr:`thresholds` that is set
        (``thresholds`` is a :class:`~ftdoctor.thresholds.Thresholds`; a key set to None is not judged)."""
        return []

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        """(label, text) lines for the report's summary panel."""
        return []

    @classmethod
    def layer_rows(cls, figures: Figures) -> list[dict[str, Any]]:
        """The per-layer rows the :attr:`columns` read (default: ``figures["layers"]``)."""
        return list(figures.get("layers") or [])

    def findings(self, result: ProbeResult, thresholds: Any) -> list[Finding]:
        """The failed verdicts of :meth:`judge` as findings (a passed one with praise as an info finding),
        plus what :meth:`problems` finds that no threshold decides."""
        problems = self.problems(result)
        if any(f.severity == "error" for f in problems):
            return problems
        out = list(problems)
        for v in self.judge(result.figures, thresholds):
            if v.passed is False and v.value is not None:   # an unmeasured figure fails a check, says nothing here
                text = f"{v.message}: {v.explanation}" if v.explanation else v.message
                out.append(Finding(self.name, v.severity, text, v.suggestion))
            elif v.passed and v.praise:
                out.append(Finding(self.name, "info", v.praise, None))
        return out

    def problems(self, result: ProbeResult) -> list[Finding]:
        """Findings beyond the thresholds (NaN or Inf where figures should be); an error stops judgement."""
        return []


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: those become null."""
    v = float(value)
    return v if np.isfinite(v) else None
