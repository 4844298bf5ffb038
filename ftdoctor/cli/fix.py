"""``ftdoctor fix``: parse, call the library, render (the method's flags are owned by its options)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ftdoctor import progress
from ftdoctor.cli.app import app, docs_page, console, output_format
from ftdoctor.cli.shared import (DATA_PANEL, OUTPUT_PANEL, DataFlags, Head, ModelArg, Quiet, Seed, csv,
                                 data_options, model_options)

FIX_PANEL = "Fix (every method)"
ENTAME_PANEL, RIFLE_PANEL, RESCALE_PANEL, DATADEP_PANEL = ("--method entame", "--method rifle",
                                                           "--method rescale", "--method datadep")


class _FixCommand(typer.core.TyperCommand):
    """Fills the list of registered fix methods into the help when (and only when) help is shown,
    so that starting the CLI does not import torch."""

    def format_help(self, ctx, formatter):  # type: ignore[override]
        from ftdoctor.fixes import FIXES
        listing = "\n\n".join(f"**{cls.name}** — {cls.summary} ({cls.paper})" for cls in FIXES.ordered())
        if "Methods:" not in (self.help or ""):
            self.help = (self.help or "") + "\n\nMethods:\n\n" + listing
        for param in self.params:
            if param.name == "method":
                param.help = "One of: " + ", ".join(FIXES.names()) + "."
        return super().format_help(ctx, formatter)


@app.command(cls=_FixCommand, epilog=docs_page("fix"))
@model_options
@data_options
def fix(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="The fix to apply.", show_default=False,
                                        rich_help_panel=FIX_PANEL)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the fixed checkpoint (same format as "
                                      "the input; never the input itself).", show_default=False,
                                      rich_help_panel=FIX_PANEL)],
    data: Annotated[str, typer.Option(
        "--data", help="The data the fix is measured and verified on: shapes[:C], fake, textlines, cifar10, ..., a "
                       "directory, .h5 or .npz.", show_default=False, rich_help_panel=DATA_PANEL)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.",
                                        rich_help_panel=FIX_PANEL)] = False,
    new_head: Annotated[bool, typer.Option(
        "--new-head", help="Replace the head by a fresh Linear for the data's classes first (needed when the "
                           "class counts differ).", rich_help_panel=FIX_PANEL)] = False,
    phi_w: Annotated[Optional[float], typer.Option(
        "--phi-w", help="Variance of the head's weights, W ~ N(0, φ_w) (ENTAME eq. 21; default 1e-12).",
        rich_help_panel=ENTAME_PANEL)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="With --lam: φ_w = lr²·lam²/C².",
                                                rich_help_panel=ENTAME_PANEL)] = None,
    lam: Annotated[Optional[float], typer.Option("--lam", help="With --lr: φ_w = lr²·lam²/C².",
                                                 rich_help_panel=ENTAME_PANEL)] = None,
    feature_norm: Annotated[bool, typer.Option(
        "--feature-norm", help="Put ENTAME's parameter-free z-normalisation (eq. 20) in front of the head, its "
                               "eval statistics set from the data.", rich_help_panel=ENTAME_PANEL)] = False,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="torch-default (reset_parameters, as RIFLE's code) or kaiming-normal [default: "
                       "torch-default].", rich_help_panel=RIFLE_PANEL)] = None,
    solver: Annotated[Optional[str], typer.Option(
        "--solver", help="joint (least squares on the exact effect of a rescale) or paper (Alg. 2's damped "
                         "iteration) [default: joint].", rich_help_panel=RESCALE_PANEL)] = None,
    damping: Annotated[Optional[float], typer.Option(
        "--damping", help="α of --solver paper [default: 0.25].", rich_help_panel=RESCALE_PANEL)] = None,
    target_spread: Annotated[Optional[float], typer.Option(
        "--target-spread", help="Stop once max/min change rate is at most this [default: 1.2].",
        rich_help_panel=RESCALE_PANEL)] = None,
    max_iterations: Annotated[Optional[int], typer.Option(
        "--max-iterations", help="Rounds of measure-and-rescale [default: 5 joint, 10 paper].",
        rich_help_panel=RESCALE_PANEL)] = None,
    samples: Annotated[Optional[int], typer.Option(
        "--samples", help="Examples used to measure the change rates [default: all loaded].",
        rich_help_panel=RESCALE_PANEL)] = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Glob(s), comma-separated, of the layers to re-initialise [default: the head].",
        rich_help_panel=DATADEP_PANEL)] = None,
    beta: Annotated[Optional[float], typer.Option(
        "--beta", help="Mean the output channels are centred on [default: 0].",
        rich_help_panel=DATADEP_PANEL)] = None,
    head: Head = None, seed: Seed = 0,
    format: Annotated[str, typer.Option("--format", help="table, or json (the sidecar record).",
                                        rich_help_panel=OUTPUT_PANEL)] = "table",
    quiet: Quiet = False, model_opts: Any = None, data_flags: DataFlags = DataFlags(),
) -> None:
    """Write a repaired checkpoint: apply one method, verify it on the data, and save it in the input's
    format (never over the input), with a sidecar OUT.ftdoctor.json. A failed verification exits 1 and
    writes nothing.

    Example: ftdoctor fix model.pt --method entame --data shapes:5 --new-head -o model_entame.pt
    """
    from ftdoctor.fixes import FixFailed, fix as run_fix
    progress.set_quiet(quiet)
    fmt = output_format(format, "fix")
    flags = {"phi_w": phi_w, "lr": lr, "lam": lam, "feature_norm": feature_norm, "init": init, "solver": solver,
             "damping": damping, "target_spread": target_spread, "max_iterations": max_iterations,
             "samples": samples, "layers": csv(layers), "beta": beta}
    try:
        result = run_fix(model, method, out=out, options=flags, head=head, new_head=new_head, seed=seed,
                         force=force, model=model_opts, data=data_flags.options(data, seed))
    except FixFailed as exc:
        fmt.show(exc.result, console(), notes=not quiet)
        raise
    fmt.show(result, console(), notes=not quiet)
