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


class DataError(FtdoctorError):
    """Unusable data found while reading it (NaN images, an unreadable file): exit 2 for every command,
    even ``check``, which turns a checkpoint's own problems into failed checks."""


class VerificationFailed(FtdoctorError):
    """A fix whose result did not pass its verification (exit 1, nothing written)."""

    def __init__(self, cause: str, remedy: str) -> None:
        super().__init__(cause, remedy, exit_code=1)


_CARRIED = "ftdoctor-error:"


class CarriedError(DataError):
    """An :class:`FtdoctorError` carried out of a DataLoader worker process.

    torch re-raises a worker's exception in the main process by calling its
    type with the worker's formatted traceback as the only argument, so the
    cause and remedy travel inside that text (after a marker, as JSON) and are
    read back here: the user sees the real cause, not a wrapped internal error.
    """

    def __init__(self, message: str) -> None:
        import json
        import re

        found = re.findall(re.escape(_CARRIED) + r"(\{.*?\})\s*$", message, re.M)
        try:
            data = json.loads(found[-1]) if found else {}
        except ValueError:
            data = {}
        cause = data.get("cause") or (message.strip().splitlines() or ["a data loader worker failed"])[-1]
        super().__init__(cause, data.get("remedy") or "rerun with --workers 0 to see the error directly",
                         int(data.get("exit_code", 2)))

    @classmethod
    def carry(cls, exc: FtdoctorError) -> "CarriedError":
        import json

        return cls(_CARRIED + json.dumps({"cause": exc.cause, "remedy": exc.remedy, "exit_code": exc.exit_code}))

    def __str__(self) -> str:
        import json

        return _CARRIED + json.dumps({"cause": self.cause, "remedy": self.remedy, "exit_code": self.exit_code})
