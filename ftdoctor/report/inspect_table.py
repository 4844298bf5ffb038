"""``ftdoctor inspect`` for a terminal: one row per affine layer, then the model's summary."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ftdoctor.inspection import Inspection


def render(res: Inspection, console: Console) -> None:
    m = res.model
    table = Table(title=f"[bold]{m['path']}[/]", title_justify="left", header_style="bold")
    for col, justify in (("#", "right"), ("layer", "left"), ("kind", "left"), ("weight shape", "left"),
                         ("params", "right"), ("finite", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    for i, l in enumerate(res.layers):
        finite = "[green]yes[/]" if l["finite"] else "[bold red]NO[/]"
        name = f"[bold]{l['name']}[/]" if l["name"] == m["head"] else l["name"]
        table.add_row(str(i), name, l["kind"], "×".join(map(str, l["shape"])), f"{l['params']:,}", finite)
    console.print(table)
    bad = [l["name"] for l in res.layers if not l["finite"]]
    console.print(f"format [bold]{m['format']}[/], architecture [bold]{m['arch'] or 'unknown'}[/], "
                  f"{m['num_params']:,} parameters, {len(res.layers)} affine layers "
                  f"({res.order} order), head [bold]{m['head']}[/] → {m['num_classes']} classes"
                  + (f", [bold red]non-finite weights in {', '.join(bad[:5])}[/]" if bad else ""))
    if res.pickle_scan is not None:
        console.print(f"pickles: {res.pickle_scan.summary()}", soft_wrap=True, markup=False)
