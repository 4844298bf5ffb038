"""The probe report for a terminal (rich): one row per layer, every probe side by side.

Change rates and gradient norms carry a small log-scale bar, so a glance
shows where gradients die or rates jump; a summary panel and the findings follow.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ftdoctor.numbers import fmt
from ftdoctor.data.subset import describe
from ftdoctor.report.formats import OutputFormat, register_format

_BLOCKS = " ▏▎▍▌▋▊▉█"
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def log_bar(v: float | None, lo: float, hi: float, width: int = 8) -> str:
    """A bar whose length is v's position between lo and hi on a log scale."""
    if v is None or v <= 0 or lo <= 0 or hi <= 0:
        return " " * width
    frac = 1.0 if hi == lo else (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    eighths = max(1, round(frac * width * 8))
    full, part = divmod(eighths, 8)
    return ("█" * full + (_BLOCKS[part] if part else "")).ljust(width)


def _range(values: Iterable[float | None]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and v > 0]
    return (min(vals), max(vals)) if vals else (0.0, 0.0)


def layer_rows(doc: dict[str, Any], bars: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer table (plain strings; bars optional): each probe in the report adds
    the columns it declares (``Probe.columns``), rows matched by layer name."""
    from ftdoctor.probes import PROBES

    header = ["layer", "kind"]
    blocks: list[tuple[Any, dict[str, dict[str, Any]]]] = []
    names: list[str] = []
    kinds: dict[str, str] = {}
    for probe, figures in doc["probes"].items():
        cls = PROBES.get(probe)
        if cls is None or not cls.columns:
            continue
        rows = {r["name"]: r for r in cls.layer_rows(figures)}
        if not rows:
            continue
        blocks.append((cls, rows))
        header += [c.header for c in cls.columns]
        for name, r in rows.items():
            if name not in names:
                names.append(name)
            if name not in kinds and r.get("kind"):
                kinds[name] = r["kind"]
    ranges = {(id(cls), c.key): _range(r.get(c.key) for r in rows.values())
              for cls, rows in blocks for c in cls.columns if c.bar}
    out = []
    for name in names:
        row = [name, kinds.get(name, "")]
        for cls, rows in blocks:
            r = rows.get(name, {})
            for c in cls.columns:
                bar = log_bar(r.get(c.key), *ranges[(id(cls), c.key)]) + " " if bars and c.bar else ""
                row.append(bar + fmt(r.get(c.key)))
        out.append(row)
    return header, out


_NAME_MIN = 16          # a layer name folds to no less than this many characters


def _width(header: list[str], rows: list[list[str]], name_min: int = _NAME_MIN) -> int:
    """Characters a table of these cells takes (rich's default box: 3 per column and one more), the first
    column folded down to ``name_min``; no other column is ever narrower than its widest cell or header."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    widths[0] = min(widths[0], name_min)
    return sum(widths) + 3 * len(widths) + 1


def fitted_tables(doc: dict[str, Any], width: int) -> list[tuple[list[str], list[list[str]]]]:
    """The per-layer table as it fits ``width`` columns, numbers never cut: with log bars if they fit, else
    without them, else without the kind column; layer names whole if they fit, else folded; else the
    number columns stacked in several tables, each repeating the layer names."""
    with_bars = layer_rows(doc, bars=True)
    if not with_bars[1]:
        return []
    header, rows = layer_rows(doc, bars=False)
    no_kind = ([header[0], *header[2:]], [[r[0], *r[2:]] for r in rows])
    for name_min in (10**6, _NAME_MIN):          # whole layer names first, folded ones next
        for h, r in (with_bars, (header, rows), no_kind):
            if _width(h, r, name_min) <= width:
                return [(h, r)]
    header, rows = no_kind
    tables: list[tuple[list[str], list[list[str]]]] = []

    def cut(cols: list[int]) -> tuple[list[str], list[list[str]]]:
        return [header[i] for i in cols], [[r[i] for i in cols] for r in rows]

    columns: list[int] = []
    for j in range(1, len(header)):
        if columns and _width(*cut([0, *columns, j])) > width:
            tables.append(cut([0, *columns]))
            columns = []
        columns.append(j)
    tables.append(cut([0, *columns]))
    return tables


def skipped_lines(skipped: list[dict[str, str]], shown: int = 3) -> list[str]:
    """One line per (probe, reason): how many layers, the first ``shown`` of them by name."""
    groups: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        groups.setdefault((s["probe"], s["reason"]), []).append(s["name"])
    out = []
    for (probe, reason), names in groups.items():
        if len(names) == 1:
            out.append(f"skipped [{probe}] {names[0]}: {reason}")
            continue
        listed = ", ".join(names[:shown]) + (f", … ({len(names) - shown} more)" if len(names) > shown else "")
        out.append(f"skipped [{probe}] {len(names)} layers ({listed}): {reason}")
    return out


def summary_items(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary panel: each probe's own lines (``Probe.summary``), in report order."""
    from ftdoctor.probes import PROBES

    return [item for probe, figures in doc["probes"].items() if probe in PROBES
            for item in PROBES[probe].summary(figures)]


def render(doc: dict[str, Any], console: Console, notes: Iterable[str] = ()) -> None:
    m, d = doc["model"], doc["data"]
    title = (f"[bold]{m['path']}[/] — {m['arch'] or 'model'} ({m['format']}), {m['num_params']:,} params, "
             f"head [bold]{m['head']}[/] → {m['num_classes']} classes; data {d['name']} "
             f"({d['split']}, {describe(d.get('subset'), d['num_samples'])})")
    tables = fitted_tables(doc, console.width)
    if tables:
        for i, (header, rows) in enumerate(tables):
            table = Table(title=title if i == 0 else None, title_justify="left", show_lines=False,
                          header_style="bold")
            for j, h in enumerate(header):
                if j == 0:       # the layer name folds onto a second line rather than push a number out
                    table.add_column(h, overflow="fold", min_width=min(_NAME_MIN, max(len(r[0]) for r in rows)))
                else:
                    table.add_column(h, justify="left" if h == "kind" else "right", no_wrap=True,
                                     min_width=max([len(h)] + [len(r[j]) for r in rows]))
            for r in rows:
                table.add_row(*r)
            console.print(table)
    else:
        console.print(title)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for k, v in summary_items(doc):
        summary.add_row(k, v)
    console.print(Panel(summary, title="summary", title_align="left"))
    for note in notes:
        console.print(Text(f"note: {note}", style="dim"))
    findings = doc["findings"]
    parts = []
    for i, f in enumerate(findings, 1):
        t = Text(f"{i} ")
        t.append(f"{f['severity']:<7} ", style=_SEVERITY_STYLE.get(f["severity"], ""))
        t.append(f"[{f['probe']}] {f['message']}")
        parts.append(t)
    for line in skipped_lines(doc["skipped"]):
        parts.append(Text(line, style="dim"))
    console.print(Panel(Group(*parts) if parts else Text("no findings"), title="findings", title_align="left"))
    # the suggestions outside the panel, one unbroken line each, so that a command copies as it runs
    for i, f in enumerate(findings, 1):
        if f.get("suggestion"):
            console.print(Text(f"{i} → {f['suggestion']}", style="green"), soft_wrap=True)


def _render_probe(result: Any, console: Console, notes: bool) -> None:
    render(result.to_json(), console, notes=result.notes if notes else [])


def _render_inspect(result: Any, console: Console, notes: bool) -> None:
    from ftdoctor.report.inspect_table import render as render_inspect
    render_inspect(result, console)


def _render_fix(result: Any, console: Console, notes: bool) -> None:
    from ftdoctor.fixes.render import render as render_fix
    render_fix(result, console, notes=notes)


def _render_trace(result: Any, console: Console, notes: bool) -> None:
    from ftdoctor.dynamics import render_trace
    render_trace(result, console)


def _render_compare(result: Any, console: Console, notes: bool) -> None:
    from ftdoctor.dynamics import render_compare
    render_compare(result, console)


@register_format
class TableFormat(OutputFormat):
    """The terminal view (rich): per-layer tables with log bars, summaries, findings, verification tables."""

    name = "table"
    kinds = frozenset({"probe", "inspect", "fix", "trace", "compare"})
    renderers = {"probe": _render_probe, "inspect": _render_inspect, "fix": _render_fix, "trace": _render_trace,
                 "compare": _render_compare}

    def show(self, result: Any, console: Console, *, notes: bool = True) -> None:
        self.renderers[result.kind](result, console, notes)

    def text(self, result: Any) -> str:
        import io
        buf = io.StringIO()
        self.show(result, Console(file=buf, width=120, color_system=None, highlight=False, force_terminal=False))
        return buf.getvalue()
