"""Output formats: one interface, looked up by name (``--format NAME``), one module each.

A result (a probe :class:`~ftdoctor.diagnose.Report`, a check report, an
inspection, a trace or compare result, a fix result) has a ``kind`` and a
``to_json()``. An :class:`OutputFormat` says which kinds it renders and how:
:meth:`~OutputFormat.text` (what ``--output FILE`` holds and what goes to
stdout), :meth:`~OutputFormat.show` (the terminal view; the text by default)
and :meth:`~OutputFormat.write` (a file; the text, atomically, by default).
Adding a format is a module with an :class:`OutputFormat` subclass decorated
with :func:`register_format`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from ftdoctor.errors import FtdoctorError
from ftdoctor.registry import Registry

FORMATS = Registry("output format", instances=True)


class OutputFormat:
    """How a result is written; subclass and decorate with :func:`register_format`."""

    name: ClassVar[str] = ""
    #: the result kinds it renders: probe, check, inspect, trace, compare, fix
    kinds: ClassVar[frozenset[str]] = frozenset()
    #: a file format only (HDF5): it has no text for a terminal
    file_only: ClassVar[bool] = False

    def text(self, result: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError(f"output format {self.name!r} must define text(), or show() and write()")

    def show(self, result: Any, console: Any, *, notes: bool = True) -> None:
        """Print ``result`` to the terminal (``console`` is a rich Console)."""
        console.file.write(self.text(result))

    def write(self, result: Any, path: Path) -> None:
        from ftdoctor.outputs import atomic_write

        text = self.text(result)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


#: class decorator: make an output format available as ``--format NAME``
register_format = FORMATS.register


class Rendered(OutputFormat):
    """A format that is one function of the result (:func:`text_format`)."""

    def __init__(self, name: str, kinds: frozenset[str], render: Any, doc: str) -> None:
        self.name, self.kinds, self.render, self.__doc__ = name, kinds, render, doc  # type: ignore[misc]

    def text(self, result: Any) -> str:
        return self.render(result)


def text_format(name: str, kinds: set[str], render: Any, doc: str) -> OutputFormat:
    """Register ``--format name``, for results of ``kinds``, as the text ``render(result)``."""
    fmt = FORMATS[name] = Rendered(name, frozenset(kinds), render, doc)
    return fmt


def names(kind: str, *, files: bool = False) -> list[str]:
    """The formats that render ``kind`` (for a terminal, or ``files`` too)."""
    return [n for n, f in FORMATS.items() if kind in f.kinds and (files or not f.file_only)]


def get(name: str, kind: str) -> OutputFormat:
    """The format ``name`` for a result of ``kind``; an FtdoctorError listing the ones there are otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None or kind not in fmt.kinds:
        raise FtdoctorError(f"--format {name} does not apply to {kind} results",
                            f"use one of: {', '.join(names(kind))}")
    return fmt


def stdout_text(text: str) -> None:
    sys.stdout.write(text)
