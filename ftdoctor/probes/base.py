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

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ftdoctor.engine.batch import Batch
from ftdoctor.engine.sums import Float64Sum
from ftdoctor.model import AffineLayer

PROBES: dict[str, type["Probe"]] = {}


def register_probe(cls: type["Probe"]) -> type["Probe"]:
    PROBES[cls.name] = cls
    return cls


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
    """A diagnosis in words (SPEC §1.6)."""

    probe: str
    severity: str  # info | warning | error
    message: str
    suggestion: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"probe": self.probe, "severity": self.severity, "message": self.message,
                "suggestion": self.suggestion}


@dataclass
class ProbeResult:
    """What a probe computed: JSON-ready figures plus arrays for the HDF5 file."""

    figures: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    array_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    options: Any = None               # ProbeOptions
    scripted: bool = False            # a TorchScript model: no Python hooks run inside it


class Probe:
    """Base class: declare states with :meth:`add_state`, then update/compute."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    # What the engine must measure per batch for this probe:
    #   "head_input", "ce_grads", "rand_grads", "grad_sq", "outputs"
    needs: ClassVar[frozenset[str]] = frozenset()

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

    # -- the template methods ------------------------------------------------
    def update(self, batch: Batch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> ProbeResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def findings(self, result: ProbeResult, thresholds: Any) -> list[Finding]:
        return []


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: those become null."""
    v = float(value)
    return v if np.isfinite(v) else None
