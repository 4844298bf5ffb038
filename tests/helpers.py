"""What many test modules share and that is not a fixture: the one CLI runner.

(Fixtures live in ``conftest.py``; this module is imported by name, ``from helpers import run_cli``.)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class CliResult:
    """What ``ftdoctor ARGS`` did: its exit code and what it printed."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __iter__(self):   # code, out, err = run_cli(...)
        return iter((self.exit_code, self.stdout, self.stderr))


def run_cli(*args: object, env: dict[str, str | None] | None = None) -> CliResult:
    """``ftdoctor ARGS`` through the real entry point (:func:`ftdoctor.cli.main`: the exit codes and the
    two-line errors users see), isolated by typer's :class:`~typer.testing.CliRunner`."""
    from typer.testing import CliRunner

    from ftdoctor.cli import main

    code = 0
    with CliRunner().isolation(env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()   # the isolation's text wrappers buffer; flush before reading the bytes
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliResult(code, stdout, stderr)
