"""``ftdoctor inspect`` and ``ftdoctor probe``: parse, call the library, render."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ftdoctor import progress
from ftdoctor.cli.app import app, docs_page, console, output_format, print_notes, print_page_written
from ftdoctor.cli.shared import (OUTPUT_PANEL, PROBE_PANEL, CRLoss, CRMode, Data, DataFlags, DType, Hdf5, Head,
                                 HeadInit, HtmlOut, ImageSize, ModelArg, OutputJson, Quiet, Seed, csv, data_options,
                                 model_options)

Format = Annotated[str, typer.Option("--format", help="table, json or markdown (probe).",
                                     rich_help_panel=OUTPUT_PANEL)]


@app.command(epilog=docs_page("inspect"))
@model_options
def inspect(
    model: ModelArg, head: Head = None, image_size: ImageSize = None, format: Format = "table",
    output: OutputJson = None, quiet: Quiet = False, model_opts: Any = None,
) -> None:
    """Layers (forward order), head, classes, parameter counts and finiteness of a checkpoint. No data."""
    from ftdoctor.inspection import inspect as run_inspect
    progress.set_quiet(quiet)
    fmt = output_format(format, "inspect")
    result = run_inspect(model, model_opts, head=head, image_size=image_size, output=output)
    fmt.show(result, console(), notes=not quiet)
    if format == "table":
        print_notes(result.notes, quiet)


@app.command(epilog=docs_page("probe"))
@model_options
@data_options
def probe(
    model: ModelArg,
    data: Data = "shapes",
    probes: Annotated[Optional[str], typer.Option(
        "--probes", help="Comma-separated: noise,change_rate,grad_norm,r2,drift (default: all that apply; "
                         "r2 and drift need --reference).", rich_help_panel=PROBE_PANEL)] = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="The pretrained checkpoint (same architecture) for r2 and drift.",
        rich_help_panel=PROBE_PANEL)] = None,
    new_head: Annotated[bool, typer.Option(
        "--new-head", help="Replace the head by a fresh one for the data's classes (ENTAME Table 1 setting).",
        rich_help_panel=PROBE_PANEL)] = False,
    head_init: Annotated[HeadInit, typer.Option("--head-init", help="How --new-head initialises the head.",
                                                rich_help_panel=PROBE_PANEL)] = HeadInit.kaiming,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="With --new-head: repeat over K fresh heads "
                                       "(mean ± 95% CI); the backbone runs once.", rich_help_panel=PROBE_PANEL)] = 1,
    change_rate_mode: Annotated[CRMode, typer.Option(
        "--change-rate-mode", help="exact per-example squares, or the cheap batch estimate.",
        rich_help_panel=PROBE_PANEL)] = CRMode.exact,
    change_rate_loss: Annotated[CRLoss, typer.Option(
        "--change-rate-loss", help="random η·logits (Krähenbühl) or per-example cross-entropy.",
        rich_help_panel=PROBE_PANEL)] = CRLoss.random,
    r2_layers: Annotated[Optional[str], typer.Option("--r2-layers", help="Glob(s) of layers for r2, comma-separated.",
                                                     rich_help_panel=PROBE_PANEL)] = None,
    dtype: Annotated[DType, typer.Option(
        "--dtype", help="Precision of the model's forward and backward: bfloat16 or float16 run them under "
        "torch.autocast (faster on GPUs); every sum stays float64. What it changes in each figure: docs/commands/probe.md.",
        rich_help_panel=PROBE_PANEL)] = DType.float32,
    head: Head = None, seed: Seed = 0, format: Format = "table", output: OutputJson = None, hdf5: Hdf5 = None,
    html: HtmlOut = None, quiet: Quiet = False, model_opts: Any = None, data_flags: DataFlags = DataFlags(),
) -> None:
    """Measure all five diagnoses in one pass over the data: noise at the head (ENTAME), change rates
    (Krähenbühl), gradient norms (RIFLE), activation R² and weight drift (L2-SP).

    Example: ftdoctor probe model.pt --data cifar10 --new-head --seeds 5
    """
    from ftdoctor.diagnose import ProbeOptions, probe as run_probe
    progress.set_quiet(quiet)
    fmt = output_format(format, "probe")
    options = ProbeOptions(probes=csv(probes), head=head, new_head=new_head, head_init=head_init.value, seeds=seeds,
                           change_rate_mode=change_rate_mode.value, change_rate_loss=change_rate_loss.value,
                           r2_layers=csv(r2_layers), seed=seed, dtype=dtype.value)
    report = run_probe(model, model=model_opts, data=data_flags.options(data, seed), options=options,
                       reference=reference, output=output, hdf5=hdf5, html=html)
    if report.main_process:                 # under torchrun rank 0 alone prints
        fmt.show(report, console(), notes=not quiet)
        print_page_written(html, quiet)
