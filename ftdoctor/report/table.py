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

_BLOCKS = " ▏▎▍▌▋▊▉█"
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


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
    """Header and rows of the per-layer table (plain strings; bars optional)."""
    probes = doc["probes"]
    cr = {l["name"]: l for l in probes.get("change_rate", {}).get("layers", [])}
    gn = {l["name"]: l for l in probes.get("grad_norm", {}).get("layers", [])}
    r2 = {l["name"]: l for l in probes.get("r2", {}).get("layers", [])}
    dr = {l["name"]: l for l in probes.get("drift", {}).get("layers", [])}
    names: list[str] = []
    for source in (probes.get("change_rate", {}).get("layers", []), probes.get("grad_norm", {}).get("layers", []),
                   probes.get("r2", {}).get("layers", []), probes.get("drift", {}).get("layers", [])):
        for l in source:
            if l["name"] not in names:
                names.append(l["name"])
    header = ["layer", "kind"]
    if cr:
        header += ["change rate", "cv"]
    if gn:
        header += ["grad norm", "to head"]
    if r2:
        header += ["R² median", "R²≈id"]
    if dr:
        header += ["drift rel"]
    cr_lo, cr_hi = _range(l.get("change_rate") for l in cr.values())
    gn_lo, gn_hi = _range(l.get("grad_norm") for l in gn.values())
    rows = []
    for name in names:
        kind = (cr.get(name) or gn.get(name) or {}).get("kind", "")
        row = [name, kind]
        if cr:
            c = cr.get(name, {})
            bar = log_bar(c.get("change_rate"), cr_lo, cr_hi) + " " if bars else ""
            row += [bar + fmt(c.get("change_rate")), fmt(c.get("cv"))]
        if gn:
            g = gn.get(name, {})
            bar = log_bar(g.get("grad_norm"), gn_lo, gn_hi) + " " if bars else ""
            row += [bar + fmt(g.get("grad_norm")), fmt(g.get("to_head"))]
        if r2:
            r = r2.get(name, {})
            row += [fmt(r.get("median")), fmt(r.get("identity_median"))]
        if dr:
            row += [fmt(dr.get(name, {}).get("rel"))]
        rows.append(row)
    return header, rows


def summary_items(doc: dict[str, Any]) -> list[tuple[str, str]]:
    p = doc["probes"]
    items: list[tuple[str, str]] = []
    if "noise" in p:
        n = p["noise"]
        def with_ci(key: str) -> str:
            ci = n.get(f"{key}_ci95")
            return fmt(n.get(key)) + (f" ± {fmt(ci)}" if ci is not None else "")
        items += [("noise fraction (ENTAME)", f"{with_ci('noise_fraction')}  "
                   f"(floor {fmt(n.get('max_entropy_noise_fraction'))}, excess {with_ci('excess_noise_fraction')})"),
                  ("cross-entropy", f"{with_ci('cross_entropy')}  (ln C = {fmt(n.get('max_entropy_loss'))})"),
                  ("correct-class probability", with_ci("correct_prob")),
                  ("error energy into the backbone", with_ci("backbone_error_energy"))]
        if n.get("seeds"):
            items.append(("fresh heads (seeds)", str(n["seeds"])))
    if "change_rate" in p:
        c = p["change_rate"]
        items.append(("change-rate spread (Krähenbühl)",
                      f"{fmt(c.get('spread'))}  (log std {fmt(c.get('log_std'))}; {c.get('mode')}, {c.get('loss')} loss)"))
    if "grad_norm" in p:
        items.append(("depth ratio (RIFLE)", fmt(p["grad_norm"].get("depth_ratio"))))
    if "r2" in p:
        meds = [l["median"] for l in p["r2"]["layers"] if l.get("median") is not None]
        if meds:
            items.append(("R² median, deepest layer (L2-SP)", fmt(meds[-1])))
    if "drift" in p:
        d = p["drift"]
        items.append(("L2-SP penalty Σ‖W−W⁰‖²", fmt(d.get("sp_penalty")) +
                      (f"  (new: {', '.join(d['new'])})" if d.get("new") else "")))
    return items


def render(doc: dict[str, Any], console: Console, notes: Iterable[str] = ()) -> None:
    m, d = doc["model"], doc["data"]
    title = (f"[bold]{m['path']}[/] — {m['arch'] or 'model'} ({m['format']}), {m['num_params']:,} params, "
             f"head [bold]{m['head']}[/] → {m['num_classes']} classes; data {d['name']} "
             f"({d['split']}, {d['num_samples']} examples)")
    header, rows = layer_rows(doc, bars=True)
    if rows:
        table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
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
    for f in findings:
        t = Text()
        t.append(f"{f['severity']:<7} ", style=_SEVERITY_STYLE.get(f["severity"], ""))
        t.append(f"[{f['probe']}] {f['message']}")
        parts.append(t)
        if f.get("suggestion"):
            parts.append(Text(f"        → {f['suggestion']}", style="green"))
    for s in doc["skipped"]:
        parts.append(Text(f"skipped [{s['probe']}] {s['name']}: {s['reason']}", style="dim"))
    console.print(Panel(Group(*parts) if parts else Text("no findings"), title="findings", title_align="left"))
