"""One error type for every unusable input: a cause and a remedy.

The library raises :class:`FtdoctorError`; the command line prints it as two
lines on stderr (``error: <cause>`` / ``hint: <remedy>``) and exits with
``exit_code`` (2 for bad usage or unusable input, SPEC §3), with no traceback
unless ``--debug`` was given.
"""
from __future__ import annotations


class FtdoctorError(Exception):
    """An input ftdoctor cannot use, with what went wrong and what to do."""

    def __init__(self, cause: str, remedy: str, exit_code: int = 2) -> None:
        super().__init__(cause)
        self.cause = " ".join(cause.split())
        self.remedy = " ".join(remedy.split())
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.cause} ({self.remedy})"


class VerificationFailed(FtdoctorError):
    """A fix whose result did not pass its verification (exit 1, nothing written)."""

    def __init__(self, cause: str, remedy: str) -> None:
        super().__init__(cause, remedy, exit_code=1)
