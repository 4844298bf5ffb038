"""The fix plug-in interface and its registry.

A fix changes an in-memory model and proves on the data that it did what its
paper says (SPEC §2). It is three template methods:

* :meth:`Fix.before` — measure what the fix is about to change (optional);
* :meth:`Fix.apply` — change the model in place; return what it did;
* :meth:`Fix.verify` — measure again and turn the figures into :class:`Check` s.

:func:`ftdoctor.fixes.fix` (``api.py``) does the rest the same way for every
method: loading, ``--new-head``, the "only these tensors changed" check,
writing in the input's format and the sidecar. Adding a method is adding one
module with a :class:`Fix` subclass decorated with :func:`register_fix`, and
a frozen options dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Sequence, TypeVar

import torch
from torch import nn

from ftdoctor.model import AffineLayer
from ftdoctor.registry import Registry

FIXES = Registry("fix")
#: class decorator: make a fix available as ``ftdoctor fix --method NAME``
register_fix = FIXES.register


@dataclass(frozen=True)
class FixContext:
    """What a fix may use: the model (changed in place), its layers, the data, the seed."""

    model: nn.Module
    data: Any                              # a DataBundle (or anything with .loader(), .num_classes, ...)
    layers: tuple[AffineLayer, ...]        # affine layers in forward order
    head: AffineLayer
    num_classes: int
    seed: int = 0
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class Check:
    """One verified figure: before, after, what it should be, and whether it is.

    ``passed`` is None for figures that are shown but not judged.
    """

    name: str
    after: float | None
    before: float | None = None
    target: str = ""
    passed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before, "after": self.after, "target": self.target,
                "passed": self.passed}


@dataclass(frozen=True)
class LeftAlone:
    """A layer a fix did not change, and why (reported, never silent)."""

    name: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass
class FixOutcome:
    """What a fix did and how it checked it.

    ``parameters`` are the values actually used (JSON-ready); ``changes`` are
    the state-dict keys (after any head replacement) the fix is allowed to
    have changed — the caller checks that nothing else moved; ``figures`` are
    extra verification figures for the sidecar (per-layer rates, ...).
    """

    parameters: dict[str, Any]
    checks: list[Check]
    changes: set[str]
    figures: dict[str, Any] = field(default_factory=dict)
    left_alone: list[LeftAlone] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]


O = TypeVar("O")


class Fix(Generic[O]):
    """Base class of a fix. ``options_type`` is its frozen options dataclass."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""       # one line for `ftdoctor fix --help`
    paper: ClassVar[str] = ""         # where the method comes from
    options_type: ClassVar[type] = object

    def __init__(self, options: O) -> None:
        self.options = options

    def validate(self, ctx: FixContext) -> None:
        """Raise FtdoctorError for options that cannot work on this model/data (default: the options' own
        ``validate()``, if they have one)."""
        check = getattr(self.options, "validate", None)
        if check is not None:
            check()

    def before(self, ctx: FixContext) -> Any:
        """Figures measured before the change (passed to :meth:`verify`)."""
        return None

    def apply(self, ctx: FixContext, before: Any) -> Any:  # pragma: no cover - abstract
        """Change ``ctx.model`` in place; return what was done (passed to :meth:`verify`)."""
        raise NotImplementedError

    def verify(self, ctx: FixContext, before: Any, applied: Any) -> FixOutcome:  # pragma: no cover - abstract
        raise NotImplementedError


def layer_keys(model: nn.Module, names: Sequence[str]) -> set[str]:
    """Every state-dict key under the modules ``names`` (parameters and buffers)."""
    prefixes = tuple(name + "." for name in names)
    return {key for key in model.state_dict() if key.startswith(prefixes)}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor differs bit for bit (or that appeared, disappeared or changed shape)."""
    out = set(before) ^ set(after)
    for k in set(before) & set(after):
        a, b = before[k], after[k]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            out.add(k)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of the state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def within(value: float | None, target: float, tol: float) -> bool:
    return value is not None and abs(value - target) <= tol
