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


@dataclass
class Batch:
    """Everything the engine measured on one batch, shared by all probes.

    Tensors are detached. ``grad_sq`` and the per-layer gradients are filled
    only when a probe asked for them (see :attr:`Probe.needs`).
    """

    x: Tensor
    y: Tensor
    index: Tensor
    logits: Tensor                                   # (B, C)
    global_size: int = 0                             # examples in the global batch (all processes)
    head_input: Tensor | None = None                 # the head's input features
    ce_grads: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)    # ∇ of mean CE
    rand_grads: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # ∇ of Σ η·logits
    grad_sq: dict[str, Tensor] = field(default_factory=dict)  # Σ_n (∂ℓ_n/∂W)² of this batch
    outputs: dict[str, Tensor] = field(default_factory=dict)      # affine outputs (r2)
    ref_outputs: dict[str, Tensor] = field(default_factory=dict)  # reference affine outputs (r2)

    @property
    def size(self) -> int:
        return int(self.y.shape[0])


class Float64Sum:
    """A float64 running sum of same-shaped tensors, added at their own precision in blocks.

    The probes' sums stay float64, but converting every float32 addend to float64 first costs a
    float64 copy of it per batch — for resnet18's 11M weights, a third of a training step
    (measured, ``benchmarks/overhead.py``). Instead each float32 (or half) addend goes into a float32
    partial sum, folded into the float64 total every ``block`` adds and before any read: the
    partial's rounding stays within ``block``·2⁻²⁴ of the addends (1e-6 relative for 16 non-negative
    addends), far below the 1e-5 the figures are checked at, while the total of many batches is
    still accumulated in float64. float64 addends go straight into the total.
    """

    def __init__(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None,
                 block: int = 16) -> None:
        self.shape, self.device, self.block = torch.Size(shape), device, block
        self._total: Tensor | None = None      # allocated by the first fold (no zero-filled pass)
        self._partial: Tensor | None = None
        self._pending = 0

    def _target(self, like: Tensor) -> Tensor:
        # laid out like the first addend (zeros_like keeps the strides of a permuted tensor), so a
        # producer can add straight into it in its own layout (:meth:`sink`)
        if like.dtype == torch.float64:
            if self._total is None:
                self._total = torch.zeros_like(like, dtype=torch.float64, device=self.device)
            return self._total
        if self._partial is None:
            self._partial = torch.zeros_like(like, dtype=torch.float32, device=self.device)
        return self._partial

    def sink(self, dtype: torch.dtype) -> Tensor | None:
        """The tensor an addend of ``dtype`` goes into, for a producer to add into in place
        (then call :meth:`added_in_place_`); ``None`` until a first :meth:`add_` has set its layout."""
        return self._total if dtype == torch.float64 else self._partial if dtype == torch.float32 else None

    def added_in_place_(self, target: Tensor) -> "Float64Sum":
        """Count an addend a producer added into :meth:`sink`'s tensor itself."""
        if target is not self._partial and target is not self._total:
            raise ValueError("not this sum's tensor")
        self._added(target)
        return self

    def _added(self, target: Tensor) -> None:
        if target is self._partial:
            self._pending += 1
            if self._pending >= self.block:
                self.flush_()

    def add_(self, t: Tensor) -> "Float64Sum":
        """``+= t``."""
        target = self._target(t)
        target.add_(t)
        self._added(target)
        return self

    def add_square_(self, t: Tensor) -> "Float64Sum":
        """``+= t²`` (elementwise)."""
        target = self._target(t)
        target.addcmul_(t, t)
        self._added(target)
        return self

    def flush_(self) -> None:
        """Fold the float32 partial sum into the float64 total."""
        if self._partial is not None and self._pending:
            if self._total is None:
                self._total = self._partial.to(torch.float64)
            else:
                self._total.add_(self._partial)
            self._partial.zero_()
        self._pending = 0

    def value(self) -> Tensor:
        """The float64 sum of everything added so far (in the first addend's layout)."""
        self.flush_()
        if self._total is None:
            self._total = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        return self._total


def sum_of_squares(t: Tensor, row: int = 4096) -> float:
    """``Σ t²`` as a Python float, accurate to ~1e-7 relative for float32 ``t``, without a float64 copy.

    Dot products of ``row``-element rows in the tensor's precision (short sums: small rounding),
    added in float64. ``torch.linalg.vector_norm`` of a large float32 tensor drifts by 1e-4
    relative (measured on 2.4M elements), and asking it for float64 copies the tensor first.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.float64 or flat.numel() <= row:
        d = flat.double()
        return float(torch.dot(d, d))
    flat = flat.float()  # half precision: bmm in float32
    k = flat.numel() // row
    rows = flat[: k * row].view(k, 1, row)
    total = torch.bmm(rows, rows.transpose(1, 2)).sum(dtype=torch.float64)
    rest = flat[k * row:]
    return float(total) + float(torch.dot(rest.double(), rest.double()))


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
