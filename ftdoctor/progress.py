"""Rich progress bars on stderr: on for a terminal, off when piped or with ``--quiet``."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def stderr_console() -> Console:
    return Console(stderr=True)


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


class _Task:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, **fields)

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def task(description: str, total: int | None, unit: str = "") -> Iterator[_Task]:
    """A progress bar for one pass; a no-op when progress is off."""
    if not enabled():
        yield _Task(None, None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        yield _Task(progress, progress.add_task(description, total=total, status=""))
