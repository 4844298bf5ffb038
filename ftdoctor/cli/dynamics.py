"""``ftdoctor trace``, ``compare`` and ``plot``: parse, call the library, render."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ftdoctor import progress
from ftdoctor.cli.app import app, docs_page, console, output_format, print_notes, print_page_written
from ftdoctor.cli.shared import (OUTPUT_PANEL, Data, DataFlags, Head, HtmlOut, ModelArg, OutputJson, Quiet, Seed,
                                 Split, csv, data_options, model_options)

DYN_PANEL = "Fine-tuning"


class Method(str, Enum):
    base = "base"
    warmup = "warmup"
    entame = "entame"
    entame_fn = "entame-fn"
    rifle = "rifle"
    l2sp = "l2sp"


class Optim(str, Enum):
    adam = "adam"
    sgd = "sgd"


class RifleInit(str, Enum):
    torch_default = "torch-default"
    kaiming_normal = "kaiming-normal"


Steps = Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.", rich_help_panel=DYN_PANEL)]
OptimOpt = Annotated[Optim, typer.Option("--optimizer", rich_help_panel=DYN_PANEL)]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate (ENTAME: 1e-4 with adam).", rich_help_panel=DYN_PANEL)]
Momentum = Annotated[float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel=DYN_PANEL)]
EvalSplit = Annotated[Split, typer.Option("--eval-split", help="Split the accuracy is measured on.",
                                          rich_help_panel=DYN_PANEL)]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=1, help="Score the eval split every N steps (and after "
                                        "each of the first --window steps).", rich_help_panel=DYN_PANEL)]
EvalSamples = Annotated[int, typer.Option("--eval-samples", min=1, help="Examples of the eval split scored.",
                                          rich_help_panel=DYN_PANEL)]
Window = Annotated[int, typer.Option("--window", min=1, help="Early accuracy = mean over the first N steps "
                                     "(ENTAME Table 3).", rich_help_panel=DYN_PANEL)]
WarmupSteps = Annotated[int, typer.Option("--warmup-steps", min=0, help="warmup: head-only steps first.",
                                          rich_help_panel=DYN_PANEL)]
RiflePeriod = Annotated[Optional[int], typer.Option("--rifle-period", min=1, help="rifle: re-initialise the head "
                                                    "every N steps (default: a quarter of --steps).",
                                                    rich_help_panel=DYN_PANEL)]
RifleInitOpt = Annotated[RifleInit, typer.Option("--rifle-init", help="rifle: how the head is re-drawn.",
                                                 rich_help_panel=DYN_PANEL)]
Alpha = Annotated[float, typer.Option("--alpha", min=0.0, help="l2sp: pull of the shared weights towards the "
                                      "pretrained ones (α).", rich_help_panel=DYN_PANEL)]
Beta = Annotated[float, typer.Option("--beta", min=0.0, help="l2sp: weight decay of the new head (β).",
                                     rich_help_panel=DYN_PANEL)]
PhiW = Annotated[Optional[float], typer.Option("--phi-w", min=0.0, help="entame: variance of the head's weights "
                                               "(default 1e-12, or γ²λ²/C² with --lam).", rich_help_panel=DYN_PANEL)]
Lam = Annotated[Optional[float], typer.Option("--lam", min=0.0, help="entame: λ of φ_w = γ²λ²/C² (ENTAME eq. 21).",
                                              rich_help_panel=DYN_PANEL)]
Hdf5Out = Annotated[Optional[Path], typer.Option(
    "-o", "--hdf5", help="HDF5 file for the curves (/runs/METHOD/seed_S/SERIES; draw it with ftdoctor plot).",
    rich_help_panel=OUTPUT_PANEL)]
DynFormatOpt = Annotated[str, typer.Option("--format", help="table or json.", rich_help_panel=OUTPUT_PANEL)]


def _trace_options(**kw):
    from ftdoctor.dynamics import TraceOptions
    return TraceOptions.from_flags(**kw)


@app.command(epilog=docs_page("trace"))
@model_options
@data_options
def trace(
    model: ModelArg,
    data: Data = "shapes",
    method: Annotated[Method, typer.Option("--method", help="base (He head), warmup, entame, entame-fn, rifle, "
                                           "l2sp.", rich_help_panel=DYN_PANEL)] = Method.base,
    steps: Steps = 100, optimizer: OptimOpt = Optim.adam, lr: Lr = 1e-4, momentum: Momentum = 0.9,
    eval_split: EvalSplit = Split.test, eval_every: EvalEvery = 10, eval_samples: EvalSamples = 512,
    window: Window = 10, warmup_steps: WarmupSteps = 1, rifle_period: RiflePeriod = None,
    rifle_init: RifleInitOpt = RifleInit.torch_default, alpha: Alpha = 0.1, beta: Beta = 0.01,
    phi_w: PhiW = None, lam: Lam = None,
    save: Annotated[Optional[Path], typer.Option(
        "--save", help="Write the fine-tuned checkpoint here (the input's format, with a sidecar).",
        rich_help_panel=OUTPUT_PANEL)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --save file.",
                                        rich_help_panel=OUTPUT_PANEL)] = False,
    head: Head = None, seed: Seed = 0,
    hdf5: Hdf5Out = Path("trace.h5"), format: DynFormatOpt = "table", output: OutputJson = None,
    html: HtmlOut = None, quiet: Quiet = False, model_opts: Any = None, data_flags: DataFlags = DataFlags(),
) -> None:
    """Fine-tune MODEL's backbone with a fresh head by one method, recording per step the loss, accuracy,
    learning rate, per-layer gradient norms (RIFLE Fig. 2), head-input variance (ENTAME Fig. 1) and noise
    fraction; the eval split is scored after each of the first --window steps and every --eval-every steps.

    Example: ftdoctor trace model.pt --data cifar10 --method entame --steps 200 -o trace.h5
    """
    from ftdoctor.dynamics import trace as run_trace
    progress.set_quiet(quiet)
    fmt = output_format(format, "trace")
    opts = _trace_options(method=method.value, steps=steps, optimizer=optimizer.value, lr=lr,
                          momentum=momentum, batch_size=data_flags.batch_size, seed=seed, eval_every=eval_every,
                          window=window, warmup_steps=warmup_steps, rifle_period=rifle_period,
                          rifle_init=rifle_init.value, alpha=alpha, beta=beta, phi_w=phi_w, lam=lam, head=head)
    result = run_trace(model, model=model_opts, data=data_flags.options(data, seed), options=opts,
                       eval_split=eval_split.value, eval_samples=eval_samples, save=save, force=force, hdf5=hdf5,
                       output=output, html=html)
    fmt.show(result, console(), notes=not quiet)
    print_page_written(html, quiet)
    if format == "table":
        if hdf5 is not None:
            console().print(f"curves written to {hdf5} (draw them: ftdoctor plot {hdf5} -o trace.png)")
        if save is not None:
            console().print(f"fine-tuned checkpoint written to {save}")
        print_notes(list(result.notes), quiet)


@app.command(epilog=docs_page("compare"))
@model_options
@data_options
def compare(
    model: ModelArg,
    data: Data = "shapes",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods; the first is the baseline "
                                         "of the paired differences.", rich_help_panel=DYN_PANEL)] = "base,entame",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds --seed … --seed+K−1; per seed every method "
                                       "sees the same start and batches.", rich_help_panel=DYN_PANEL)] = 5,
    steps: Steps = 50, optimizer: OptimOpt = Optim.adam, lr: Lr = 1e-4, momentum: Momentum = 0.9,
    eval_split: EvalSplit = Split.test, eval_every: EvalEvery = 10, eval_samples: EvalSamples = 512,
    window: Window = 10, warmup_steps: WarmupSteps = 1, rifle_period: RiflePeriod = None,
    rifle_init: RifleInitOpt = RifleInit.torch_default, alpha: Alpha = 0.1, beta: Beta = 0.01,
    phi_w: PhiW = None, lam: Lam = None,
    head: Head = None, seed: Seed = 0,
    hdf5: Hdf5Out = Path("compare.h5"), format: DynFormatOpt = "table", output: OutputJson = None,
    html: HtmlOut = None, quiet: Quiet = False, model_opts: Any = None, data_flags: DataFlags = DataFlags(),
) -> None:
    """Several methods × seeds from identical starting weights and batches: mean eval accuracy over the first
    --window steps ± 95% CI, the paired difference to the first method with its p-value, and the final
    accuracy (ENTAME Table 3). All curves go to the HDF5 file.

    Example: ftdoctor compare model.pt --data cifar10 --methods base,warmup,entame,entame-fn --seeds 5
    """
    from ftdoctor.dynamics import compare as run_compare
    progress.set_quiet(quiet)
    fmt = output_format(format, "compare")
    opts = _trace_options(method="base", steps=steps, optimizer=optimizer.value, lr=lr, momentum=momentum,
                          batch_size=data_flags.batch_size, seed=seed, eval_every=eval_every, window=window,
                          warmup_steps=warmup_steps, rifle_period=rifle_period, rifle_init=rifle_init.value,
                          alpha=alpha, beta=beta, phi_w=phi_w, lam=lam, head=head)
    result = run_compare(model, model=model_opts, data=data_flags.options(data, seed), options=opts,
                         methods=csv(methods) or (), seeds=seeds, eval_split=eval_split.value,
                         eval_samples=eval_samples, hdf5=hdf5, output=output, html=html)
    fmt.show(result, console(), notes=not quiet)
    print_page_written(html, quiet)
    if format == "table":
        if hdf5 is not None:
            console().print(f"curves written to {hdf5} (draw them: ftdoctor plot {hdf5} -o compare.png)")
        print_notes(list(result.notes), quiet)


@app.command(epilog=docs_page("plot"))
def plot(
    file: Annotated[Path, typer.Argument(help="An HDF5 file from trace, compare or probe --hdf5.",
                                         show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--output", help="Picture to write (.png, .pdf or .svg), or .html for the self-contained report page.",
                                      show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Pictures of a trace/compare file (accuracy and loss curves with seed bands, layer × step gradient-norm
    heat map, head-input variance) or of a probe file (the noise fraction against its floor; per layer the
    change rate, gradient norm, R² box plots and drift against their thresholds), or with -o FILE.html the
    self-contained report page that --html writes.

    Needs the plot extra: pip install 'ftdoctor[plot]'

    Example: ftdoctor plot probe.h5 -o probe.html
    """
    from ftdoctor.report.plot import plot as draw
    written = draw(file, out)
    if not quiet:
        console().print(f"picture written to {written}")
