"""``ftdoctor demo``: the whole loop on built-in data."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftdoctor import progress
from ftdoctor.cli.app import app, docs_page, console
from ftdoctor.cli.shared import Quiet, Seed


@app.command(epilog=docs_page("demo"))
def demo(
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Where to write the demo's files "
                                                    "(default: a fresh temporary directory).")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """The whole loop on built-in data, no download: pretrain a small CNN on a `shapes` source task,
    inspect it, probe it on a different `shapes` target task with a new head, fix it (entame, rescale)
    and compare fine-tuning with and without ENTAME's head, writing a plot to the work directory."""
    from ftdoctor.demo import run_demo
    progress.set_quiet(quiet)
    run_demo(workdir, seed=seed, console=console())
