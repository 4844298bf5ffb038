"""What ``check`` reports: a result per check, a verdict per checkpoint, the report (``ftdoctor.check/1``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import ftdoctor
from ftdoctor.thresholds import Thresholds, plain

SCHEMA = "ftdoctor.check/1"


@dataclass(frozen=True)
class CheckResult:
    """One check of one checkpoint. ``passed`` is None when the check could not run."""

    name: str
    passed: bool | None
    value: float | int | bool | str | None
    threshold: float | int | bool | None
    message: str

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else ("passed" if self.passed else "failed")

    def to_json(self) -> dict[str, Any]:
        value = self.value
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        return {"name": self.name, "passed": self.passed, "value": value, "threshold": plain(self.threshold),
                "message": self.message}


@dataclass(frozen=True)
class CheckpointVerdict:
    """The verdict on one checkpoint: it passes when no check failed."""

    path: str
    checks: tuple[CheckResult, ...]
    sha256: str | None = None
    arch: str | None = None
    #: what the pickle scan found (:class:`ftdoctor.checkpoint.pickle_scan.PickleScan`), every global listed
    pickle_scan: Any = None

    @property
    def passed(self) -> bool:
        return not any(c.passed is False for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "sha256": self.sha256, "arch": self.arch,
                "checks": [c.to_json() for c in self.checks],
                "pickle_scan": self.pickle_scan.to_json() if self.pickle_scan is not None else None}


@dataclass(frozen=True)
class CheckReport:
    """Every verdict of one ``check`` run. Exit code 0 when all passed, 1 otherwise (SPEC §4)."""

    checkpoints: tuple[CheckpointVerdict, ...]
    thresholds: Thresholds
    kind: ClassVar[str] = "check"
    config: str | None = None
    data: str | None = None
    reference: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checkpoints)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def failures(self) -> list[tuple[CheckpointVerdict, CheckResult]]:
        return [(cp, c) for cp in self.checkpoints for c in cp.failures]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ftdoctor_version": ftdoctor.__version__, "passed": self.passed,
                "config": self.config, "data": self.data, "reference": self.reference,
                "thresholds": self.thresholds.to_json(),
                "checkpoints": [c.to_json() for c in self.checkpoints]}
