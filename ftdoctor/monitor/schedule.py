"""When a live monitor measures: every N optimizer steps, chosen steps, and the first K densely."""
from __future__ import annotations

from dataclasses import dataclass

from ftdoctor.errors import FtdoctorError


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps (0-based, the framework's ``global_step`` before the step) that are measured.

    A step is measured when it is one of the first ``first`` steps (ENTAME's noise is the error of the
    first steps), a multiple of ``every`` (0: never by period), or listed in ``steps``. The default,
    ``every=50, first=3``, measures steps 0, 1, 2, 50, 100, …: a monitored run's cost is that of about
    one step in fifty measured (docs/performance.md, "Monitoring a training run", gives the measured ratios).
    """

    every: int = 50
    first: int = 3
    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.every < 0 or self.first < 0 or any(s < 0 for s in self.steps):
            raise FtdoctorError(f"a schedule's every, first and steps must be >= 0, got {self}",
                                "e.g. Schedule(every=50, first=3) or Schedule(steps=(0, 10, 100))")
        object.__setattr__(self, "steps", tuple(sorted({int(s) for s in self.steps})))

    def __contains__(self, step: int) -> bool:
        return step < self.first or (self.every > 0 and step % self.every == 0) or step in self.steps

    @classmethod
    def of(cls, value: "Schedule | int | tuple[int, ...] | list[int] | None") -> "Schedule":
        """A schedule from a :class:`Schedule`, an ``every`` (int) or an explicit list of steps."""
        if value is None:
            return cls()
        if isinstance(value, Schedule):
            return value
        if isinstance(value, int):
            return cls(every=value)
        return cls(every=0, first=0, steps=tuple(value))
