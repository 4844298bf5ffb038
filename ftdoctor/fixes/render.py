"""Human output of ``ftdoctor fix``: the verification before/after, the layers left alone, where it wrote."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftdoctor.data.subset import describe
from ftdoctor.fixes.api import FixResult


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    a = abs(v)
    return f"{v:.3e}" if (a >= 1e5 or a < 1e-3) else f"{v:.4f}"


def render(result: FixResult, console: Console, *, notes: bool = True) -> None:
    """Print what the fix did and how it checked it; works for a failed verification too."""
    o = result.outcome
    console.print(f"[bold]fix {result.method}[/] of {result.input_path} "
                  f"[dim]({result.format}, {result.arch or 'pickled module'}, head {result.head}, "
                  f"{result.data['name']} {result.data['split']}: "
                  f"{describe(result.data.get('subset'), result.data['num_samples'])}, "
                  f"{result.num_classes} classes)[/]")
    params = ", ".join(f"{k}={v}" for k, v in o.parameters.items() if v is not None)
    if params:
        console.print(f"parameters: {params}; seed {result.settings.get('seed')}")
    table = Table(title="verification on the data", title_justify="left", show_edge=False)
    for col in ("figure", "before", "after", "target", ""):
        table.add_column(col, justify="right" if col in ("before", "after") else "left")
    for c in o.checks:
        mark = {True: "[green]✓[/]", False: "[bold red]✗[/]", None: ""}[c.passed]
        table.add_row(c.name, fmt(c.before), fmt(c.after), c.target, mark)
    console.print(table)
    layers = o.figures.get("layers")
    if result.method == "rescale" and layers:
        t = Table(title="change rates per layer (Krähenbühl Fig. 1a)", title_justify="left", show_edge=False)
        for col in ("layer", "kind", "before", "after", "scale r", "undone in"):
            t.add_column(col, justify="right" if col in ("before", "after", "scale r") else "left")
        for row in layers:
            t.add_row(row["name"], row["kind"], fmt(row["change_rate_before"]), fmt(row["change_rate_after"]),
                      fmt(row["scale"]), row["undone_in"] or "—")
        console.print(t)
        per_round = o.figures.get("spread_per_round") or []
        console.print("spread per round: " + " → ".join(fmt(s) for s in per_round))
    if result.method == "datadep" and layers:
        t = Table(title="output channels (Krähenbühl Alg. 1)", title_justify="left", show_edge=False)
        for col in ("layer", "channels", "mean before", "std before", "mean after", "std after"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        for row in layers:
            t.add_row(row["name"], str(row["channels"]), fmt(row["mean_before"]), fmt(row["std_before"]),
                      fmt(row["mean_after"]), fmt(row["std_after"]))
        console.print(t)
    if o.left_alone:
        console.print("[bold]left alone:[/]")
        for item in o.left_alone:
            console.print(f"  {item.name}: {item.reason}", soft_wrap=True)
    for n in list(result.notes) + list(o.notes):
        if n.startswith("warning: "):      # shown even with --quiet
            console.print(Text(n, style="yellow"), soft_wrap=True)
        elif notes:
            console.print(Text(f"note: {n}", style="dim"), soft_wrap=True)
    if result.out is not None and result.output_sha256:
        console.print(f"[green]wrote[/] {result.out} ({result.format}, sha256 {result.output_sha256[:12]}…) "
                      f"and {result.sidecar.name if result.sidecar else 'no sidecar'}")
    elif not o.passed:
        console.print("[bold red]verification failed: nothing was written[/]")
