"""``ftdoctor check`` for a terminal (rich): one table per checkpoint, then a one-line tally."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftdoctor.check import CheckReport, CheckResult
from ftdoctor.numbers import plain
from ftdoctor.report.formats import OutputFormat, register_format

_MARK = {"passed": ("✓", "green"), "failed": ("✗", "bold red"), "skipped": ("–", "dim")}


def _value(c: CheckResult) -> str:
    return plain(c.value, "–", ".4g")


def _threshold(c: CheckResult) -> str:
    return plain(c.threshold, "", ".4g")


def render(report: CheckReport, console: Console) -> None:
    for cp in report.checkpoints:
        verdict = Text("PASS", style="bold green") if cp.passed else Text("FAIL", style="bold red")
        title = Text.assemble(verdict, " ", (cp.path, "bold"),
                              (f"  {cp.arch}" if cp.arch else "", "dim"))
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, expand=False)
        table.add_column("", no_wrap=True)
        table.add_column("check", no_wrap=True)
        table.add_column("value", justify="right", no_wrap=True)
        table.add_column("threshold", justify="right", no_wrap=True)
        table.add_column("message", overflow="fold")
        for c in cp.checks:
            mark, style = _MARK[c.status]
            table.add_row(Text(mark, style=style), Text(c.name, style=style if c.passed is False else ""),
                          _value(c), _threshold(c), Text(c.message, style="dim" if c.passed is None else ""))
        console.print(table)
        console.print()
    n = len(report.checkpoints)
    failed = sum(1 for cp in report.checkpoints if not cp.passed)
    checks = len(report.failures())
    source = f" (thresholds from {report.config})" if report.config else " (default thresholds)"
    if failed:
        console.print(Text.assemble(("FAILED", "bold red"),
                                    f": {failed} of {n} checkpoint(s), {checks} failed check(s){source}"))
    else:
        console.print(Text.assemble(("PASSED", "bold green"), f": {n} checkpoint(s){source}"))


def to_string(report: CheckReport, width: int = 120) -> str:
    """The same view as plain text (for ``--output FILE``): no colour, fixed width."""
    import io
    buf = io.StringIO()
    render(report, Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False))
    return buf.getvalue()


@register_format
class CheckTextFormat(OutputFormat):
    """``check`` for a terminal: a table per checkpoint and a tally (plain text in a file)."""

    name = "text"
    kinds = frozenset({"check"})

    def text(self, result: Any) -> str:
        return to_string(result)

    def show(self, result: Any, console: Console, *, notes: bool = True) -> None:
        render(result, console)
