"""The ``ftdoctor`` command: parse options, call one library function, render. Nothing else.

:mod:`.app` holds the typer application and the edge where errors become exit
codes; :mod:`.shared` declares every shared option once; one module per command
group: :mod:`.probe` (``inspect``, ``probe``), :mod:`.fix`, :mod:`.check`,
:mod:`.dynamics` (``trace``, ``compare``, ``plot``), :mod:`.demo`.
"""
from __future__ import annotations

from ftdoctor.cli.app import app, main
from ftdoctor.cli import probe, fix, check, dynamics, demo  # noqa: F401,E402  (the commands register themselves)

__all__ = ["app", "main"]
