"""GitHub Actions workflow commands for ``ftdoctor check`` (SPEC §4).

One ``::error title=ftdoctor <check>::<file>: <message>`` line per failed check,
nothing for passed or skipped ones. Property and message text are escaped as
the Actions runner expects (``%``, CR, LF; and ``:``/``,`` inside properties), so
a hostile file name cannot forge a second command.
"""
from __future__ import annotations


from ftdoctor.check import CheckReport
from ftdoctor.report.formats import text_format


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render(report: CheckReport) -> str:
    lines = [f"::error title={escape_property('ftdoctor ' + check.name)}::"
             f"{escape_data(verdict.path)}: {escape_data(check.message)}"
             for verdict, check in report.failures()]
    return "".join(line + "\n" for line in lines)


text_format("github", {"check"}, render, "GitHub Actions annotations: an ``::error`` line per failed check.")
