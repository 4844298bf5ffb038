"""The ``ftdoctor`` command: parse options, call the library, render. Nothing else.

Every command forwards to a documented library call; :func:`main` turns an
:class:`~ftdoctor.errors.FtdoctorError` into two lines on stderr (cause and
remedy) and its exit code, with no traceback unless ``--debug``.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftdoctor import __version__
from ftdoctor import progress
from ftdoctor.allocator import keep_freed_memory
from ftdoctor.errors import FtdoctorError

app = typer.Typer(
    name="ftdoctor",
    help="Diagnose and repair the dynamics of fine-tuning a pretrained classifier.\n\n"
         "Measurements from four papers — ENTAME (noise at the head), Krähenbühl et al. (change rates), "
         "RIFLE (gradient norms) and L2-SP (R² and drift) — on your checkpoint and data, and fixes "
         "that write a repaired checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",   # docstrings wrap like paragraphs; `[plot]` is not taken for markup
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# -- shared options ----------------------------------------------------------------------------
MODEL_PANEL, DATA_PANEL, OUTPUT_PANEL, PROBE_PANEL = "Model", "Data", "Output", "Probes"

ModelArg = Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin/.ckpt (state dict, wrapped, "
                                                "pickled module, TorchScript) or .safetensors.",
                                           show_default=False)]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="torchvision builder name (resnet18, vgg16_bn, vit_b_16, ...) or pkg.module:callable; "
                   "recognised from the state dict when omitted.", rich_help_panel=MODEL_PANEL)]
NumClasses = Annotated[Optional[int], typer.Option(
    "--num-classes", help="Classes of the checkpoint's head (inferred from the head weight when omitted).",
    rich_help_panel=MODEL_PANEL, min=1)]
Head = Annotated[Optional[str], typer.Option(
    "--head", help="Qualified name of the head layer (default: the last affine layer run).",
    rich_help_panel=MODEL_PANEL)]
Trust = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Allow full pickled modules (runs code from the file: only for files you trust).",
    rich_help_panel=MODEL_PANEL)]
NonStrict = Annotated[bool, typer.Option(
    "--non-strict", help="Load a state dict whose keys do not all match the architecture.",
    rich_help_panel=MODEL_PANEL)]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]

Data = Annotated[str, typer.Option(
    "--data", help="shapes[:C], fake, cifar10, cifar100, mnist, fashion-mnist, svhn, an ImageFolder "
                   "directory, a .h5/.hdf5 or .npz file.", rich_help_panel=DATA_PANEL)]
DataRoot = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Where torchvision datasets live (default $FTDOCTOR_DATA or ~/.cache/ftdoctor/data).",
    rich_help_panel=DATA_PANEL)]
Download = Annotated[bool, typer.Option("--download", help="Allow torchvision to download a dataset.",
                                        rich_help_panel=DATA_PANEL)]


class Split(str, Enum):
    train = "train"
    test = "test"


class Normalize(str, Enum):
    imagenet = "imagenet"
    dataset = "dataset"
    none = "none"


SplitOpt = Annotated[Split, typer.Option("--split", rich_help_panel=DATA_PANEL)]
MaxSamples = Annotated[int, typer.Option("--max-samples", min=1, help="Use the first N examples of the split.",
                                         rich_help_panel=DATA_PANEL)]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, rich_help_panel=DATA_PANEL)]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", min=1, help="Resize images to S×S.",
                                                  rich_help_panel=DATA_PANEL)]
NormalizeOpt = Annotated[Normalize, typer.Option(
    "--normalize", help="imagenet mean/std, the data's own per-channel statistics, or none.",
    rich_help_panel=DATA_PANEL)]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.",
                                      rich_help_panel=DATA_PANEL)]
Seed = Annotated[int, typer.Option("--seed", help="Seeds every random draw: same seed, same figures.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.",
                                     rich_help_panel=OUTPUT_PANEL)]
OutputJson = Annotated[Optional[Path], typer.Option("--output", help="Also write the JSON report to FILE.",
                                                    rich_help_panel=OUTPUT_PANEL)]


def model_options(arch: str | None, num_classes: int | None, trust: bool, non_strict: bool, device: str):
    from ftdoctor.checkpoint import ModelOptions
    return ModelOptions(arch=arch, num_classes=num_classes, trust_checkpoint=trust, non_strict=non_strict,
                        device=device)


def data_options(data: str, data_root: Path | None, download: bool, split: Split, max_samples: int,
                 batch_size: int, image_size: int | None, normalize: Normalize, workers: int, seed: int):
    from ftdoctor.data import DataOptions
    return DataOptions(data=data, data_root=str(data_root) if data_root else None, download=download,
                       split=split.value, max_samples=max_samples, batch_size=batch_size, image_size=image_size,
                       normalize=normalize.value, workers=workers, seed=seed)


def writes(*outputs: tuple[Path | None, str, bool], inputs: tuple = (), force: bool = False):
    """The command's outputs ``(path, flag, may replace an existing file)``, checked against its inputs before
    any work, then kept all together or not at all (:func:`ftdoctor.outputs.journal`)."""
    from ftdoctor.outputs import Output, journal
    return journal([Output(Path(p), flag, replace) for p, flag, replace in outputs if p is not None],
                   inputs, force=force)


def data_inputs(data: str | None, data_root: Path | None) -> list[Path]:
    from ftdoctor.data import input_paths
    return input_paths(data, str(data_root) if data_root else None) if data else []


def console(stderr: bool = False):
    """A rich console; when the stream is not a terminal, wide enough that tables are not squeezed."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, width=width)


def print_notes(notes: list[str], quiet: bool) -> None:
    if quiet:
        return
    err = console(stderr=True)
    for n in notes:
        err.print(f"[dim]note: {n}[/]")


def emit_json(doc: dict, output: Path | None, to_stdout: bool) -> None:
    from ftdoctor.report import json as json_report
    if output is not None:
        json_report.write(doc, output)
    if to_stdout:
        sys.stdout.write(json_report.dumps(doc))


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        typer.echo(f"ftdoctor {__version__}")
        raise typer.Exit(0)


# -- inspect -------------------------------------------------------------------------------------
class InspectFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
def inspect(
    model: ModelArg,
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    image_size: ImageSize = None,
    format: Annotated[InspectFormat, typer.Option("--format", rich_help_panel=OUTPUT_PANEL)] = InspectFormat.table,
    output: OutputJson = None, quiet: Quiet = False,
) -> None:
    """Layers (forward order), head, classes, parameter counts and finiteness of a checkpoint. No data."""
    from ftdoctor.inspection import inspect as run_inspect
    progress.set_quiet(quiet)
    with writes((output, "--output", True), inputs=(model,)):
        res = run_inspect(model, model_options(arch, num_classes, trust_checkpoint, non_strict, device),
                          head=head, image_size=image_size)
        doc = res.to_json()
        emit_json(doc, output, format == InspectFormat.json)
    if format == InspectFormat.table:
        from ftdoctor.report.inspect_table import render
        render(res, console())
        print_notes(res.notes, quiet)


# -- probe ---------------------------------------------------------------------------------------
class ProbeFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


class HeadInit(str, Enum):
    kaiming = "kaiming"
    torch_default = "torch-default"
    entame = "entame"


class CRMode(str, Enum):
    exact = "exact"
    batch = "batch"


class CRLoss(str, Enum):
    random = "random"
    ce = "ce"


def _csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@app.command()
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
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    data_root: DataRoot = None, download: Download = False, split: SplitOpt = Split.train,
    max_samples: MaxSamples = 1024, batch_size: BatchSize = 64, image_size: ImageSize = None,
    normalize: NormalizeOpt = Normalize.imagenet, workers: Workers = 0, seed: Seed = 0,
    format: Annotated[ProbeFormat, typer.Option("--format", rich_help_panel=OUTPUT_PANEL)] = ProbeFormat.table,
    output: OutputJson = None,
    hdf5: Annotated[Optional[Path], typer.Option("--hdf5", help="Write the report and its arrays (G², per-batch "
                                                 "norms, per-channel R²) to an HDF5 file.",
                                                 rich_help_panel=OUTPUT_PANEL)] = None,
    quiet: Quiet = False,
) -> None:
    """Measure all five diagnoses in one pass over the data: noise at the head (ENTAME), change rates
    (Krähenbühl), gradient norms (RIFLE), activation R² and weight drift (L2-SP).

    Example: ftdoctor probe model.pt --data cifar10 --new-head --seeds 5
    """
    from ftdoctor.diagnose import ProbeOptions, probe as run_probe
    progress.set_quiet(quiet)
    opts = ProbeOptions(probes=_csv(probes), head=head, new_head=new_head, head_init=head_init.value, seeds=seeds,
                        change_rate_mode=change_rate_mode.value, change_rate_loss=change_rate_loss.value,
                        r2_layers=_csv(r2_layers), seed=seed)
    with writes((output, "--output", True), (hdf5, "--hdf5", True),
                inputs=(model, reference, *data_inputs(data, data_root))):
        from ftdoctor import distributed
        world = distributed.setup(device)          # under torchrun: join the process group
        if not world.is_main:
            progress.set_quiet(True)
        try:
            report = run_probe(model, model=model_options(arch, num_classes, trust_checkpoint, non_strict, device),
                               data=data_options(data, data_root, download, split, max_samples, batch_size,
                                                 image_size, normalize, workers, seed),
                               options=opts, reference=reference)
        finally:
            distributed.teardown()
        if not world.is_main:                      # rank 0 alone prints and writes
            return
        doc = report.to_json()
        if hdf5 is not None:
            from ftdoctor.report import hdf5 as hdf5_report
            hdf5_report.write(hdf5, doc["schema"], doc, report.arrays())
        emit_json(doc, output, format == ProbeFormat.json)
    if format == ProbeFormat.markdown:
        from ftdoctor.report.markdown import render as render_md
        sys.stdout.write(render_md(doc))
    elif format == ProbeFormat.table:
        from ftdoctor.report.table import render
        render(doc, console(), notes=[] if quiet else report.notes)


# -- check ---------------------------------------------------------------------------------------
class CheckFormat(str, Enum):
    text = "text"
    json = "json"
    junit = "junit"
    github = "github"


THRESHOLD_PANEL = "Thresholds (override \\[tool.ftdoctor.check]; 'off' disables a check)"


def _threshold_opt(key: str, help: str):
    return typer.Option(f"--{key.replace('_', '-')}", metavar="X|off", help=help, rich_help_panel=THRESHOLD_PANEL)


@app.command()
def check(
    models: Annotated[list[str], typer.Argument(
        help="Checkpoint files, directories (searched for .pt/.pth/.bin/.ckpt/.safetensors) or quoted globs.",
        show_default=False)],
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Also run the probe-based checks on this data (shapes[:C], fake, cifar10, ..., a "
                       "directory, .h5 or .npz); without it only the data-free checks run.",
        rich_help_panel=DATA_PANEL)] = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="The pretrained checkpoint: enables max_drift_rel (data-free) and min_r2_median.",
        rich_help_panel=PROBE_PANEL)] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML file with a \\[tool.ftdoctor.check] table (default: the nearest pyproject.toml "
                         "above the working directory that has \\[tool.ftdoctor]).",
        rich_help_panel=THRESHOLD_PANEL)] = None,
    new_head: Annotated[bool, typer.Option(
        "--new-head", help="Judge the data checks with a fresh head for the data's classes (ENTAME's setting: "
                           "how will this backbone fine-tune?).", rich_help_panel=PROBE_PANEL)] = False,
    head_init: Annotated[HeadInit, typer.Option("--head-init", help="How --new-head initialises the head.",
                                                rich_help_panel=PROBE_PANEL)] = HeadInit.kaiming,
    max_noise_fraction: Annotated[Optional[str], _threshold_opt("max_noise_fraction", "noise: ζ/φ (default 0.5).")] = None,
    max_excess_noise_fraction: Annotated[Optional[str], _threshold_opt(
        "max_excess_noise_fraction", "noise: (ζ − 1/C)/φ (default 0.05).")] = None,
    max_change_rate_spread: Annotated[Optional[str], _threshold_opt(
        "max_change_rate_spread", "change_rate: max/min over layers (default 10).")] = None,
    max_change_rate_cv: Annotated[Optional[str], _threshold_opt(
        "max_change_rate_cv", "change_rate: worst within-layer cv (default 5).")] = None,
    min_depth_ratio: Annotated[Optional[str], _threshold_opt(
        "min_depth_ratio", "grad_norm: first layer / head (default 0.01).")] = None,
    min_r2_median: Annotated[Optional[str], _threshold_opt(
        "min_r2_median", "r2: lowest per-layer median, needs --reference (default 0.5).")] = None,
    max_drift_rel: Annotated[Optional[str], _threshold_opt(
        "max_drift_rel", "drift: largest ‖W−W⁰‖/‖W⁰‖, needs --reference, no data (default 0.5).")] = None,
    expect_num_classes: Annotated[Optional[str], typer.Option(
        "--expect-num-classes", metavar="N|off", help="The head must have N outputs (default: not checked).",
        rich_help_panel=THRESHOLD_PANEL)] = None,
    require_finite: Annotated[Optional[bool], typer.Option(
        "--require-finite/--no-require-finite", help="NaN/Inf weights fail (default: on).",
        rich_help_panel=THRESHOLD_PANEL, show_default=False)] = None,
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    data_root: DataRoot = None, download: Download = False, split: SplitOpt = Split.train,
    max_samples: MaxSamples = 1024, batch_size: BatchSize = 64, image_size: ImageSize = None,
    normalize: NormalizeOpt = Normalize.imagenet, workers: Workers = 0, seed: Seed = 0,
    format: Annotated[Optional[CheckFormat], typer.Option(
        "--format", help="text, json, junit or github (default: github when GITHUB_ACTIONS=true, else text).",
        rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", help="Write the report in --format to FILE (atomically); the terminal then gets the text "
                         "view (github annotations under GitHub Actions).", rich_help_panel=OUTPUT_PANEL)] = None,
    quiet: Quiet = False,
) -> None:
    """CI gate: judge checkpoints against thresholds; exit 0 all passed, 1 any check failed, 2 unusable
    config or input.

    Data-free checks (loadable, require_finite, head_found, expect_num_classes, max_drift_rel) always run;
    the probe checks (noise, change rates, gradient depth, R²) run with --data. A checkpoint that cannot be
    loaded (corrupt, truncated, unsafe pickle) is a failed `loadable` check, exit 1, reported in every
    format; bad config or flags, no matching checkpoint or an empty directory exit 2. Thresholds: the
    \\[tool.ftdoctor.check] table of the nearest pyproject.toml above the working directory, or --config;
    flags win.

    Example: ftdoctor check 'exports/**/*.pt' --data shapes:10 --format junit --output ftdoctor.xml
    """
    from ftdoctor.check import check as run_check, resolve_thresholds
    progress.set_quiet(quiet)
    flags = {"max_noise_fraction": max_noise_fraction, "max_excess_noise_fraction": max_excess_noise_fraction,
             "max_change_rate_spread": max_change_rate_spread, "max_change_rate_cv": max_change_rate_cv,
             "min_depth_ratio": min_depth_ratio, "min_r2_median": min_r2_median, "max_drift_rel": max_drift_rel,
             "expect_num_classes": expect_num_classes, "require_finite": require_finite}
    resolved = resolve_thresholds(config, overrides={k: v for k, v in flags.items() if v is not None})
    github = os.environ.get("GITHUB_ACTIONS") == "true"
    fmt = format.value if format is not None else ("github" if github else "text")
    from ftdoctor.check import collect_checkpoints
    checkpoints = collect_checkpoints(models) if output is not None else []
    data_opts = (data_options(data, data_root, download, split, max_samples, batch_size, image_size, normalize,
                              workers, seed) if data is not None else None)
    with writes((output, "--output", True),
                inputs=(*checkpoints, reference, resolved.source, *data_inputs(data, data_root))):
        report = run_check(models, model=model_options(arch, num_classes, trust_checkpoint, non_strict, device),
                           data=data_opts, reference=reference, thresholds=resolved.thresholds, head=head,
                           new_head=new_head, head_init=head_init.value, seed=seed, image_size=image_size,
                           config=resolved.source)
        _emit_check(report, fmt, output, github, quiet)
    sys.exit(report.exit_code)  # typer.Exit(1) would come back as a return value of app(standalone_mode=False)


def _emit_check(report, fmt: str, output: Path | None, github: bool, quiet: bool) -> None:
    from ftdoctor.report import check_text
    if fmt == "json":
        from ftdoctor.report import json as json_report
        text = json_report.dumps(report.to_json())
    elif fmt == "junit":
        from ftdoctor.report import junit
        text = junit.render(report)
    elif fmt == "github":
        from ftdoctor.report import github as github_report
        text = github_report.render(report)
    else:
        text = check_text.to_string(report) if output is not None else None
    if output is None:
        if text is None:
            check_text.render(report, console())
        else:
            sys.stdout.write(text)
        return
    from ftdoctor.outputs import atomic_write
    atomic_write(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if quiet or fmt == "text" or (fmt == "github" and github):
        return
    if github:
        from ftdoctor.report import github as github_report
        sys.stdout.write(github_report.render(report))
    else:
        check_text.render(report, console())


# -- trace / compare / plot ----------------------------------------------------------------------
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


class DynFormat(str, Enum):
    table = "table"
    json = "json"


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
Hdf5Out = Annotated[Optional[Path], typer.Option("-o", "--hdf5", help="HDF5 file for the curves (SPEC §3 layout).",
                                                 rich_help_panel=OUTPUT_PANEL)]
DynFormatOpt = Annotated[DynFormat, typer.Option("--format", rich_help_panel=OUTPUT_PANEL)]


def _trace_options(**kw):
    from ftdoctor.dynamics import TraceOptions
    if kw["phi_w"] is not None and kw["lam"] is not None:
        raise FtdoctorError("--phi-w and --lam both set φ_w", "pass one of them")
    if kw["phi_w"] is None:
        kw.pop("phi_w")
    return TraceOptions(**kw)


@app.command()
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
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the fine-tuned checkpoint here (the "
                                                 "input's format, with a sidecar).", rich_help_panel=OUTPUT_PANEL)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --save file.",
                                        rich_help_panel=OUTPUT_PANEL)] = False,
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    data_root: DataRoot = None, download: Download = False, split: SplitOpt = Split.train,
    max_samples: MaxSamples = 1024, batch_size: BatchSize = 64, image_size: ImageSize = None,
    normalize: NormalizeOpt = Normalize.imagenet, workers: Workers = 0, seed: Seed = 0,
    hdf5: Hdf5Out = Path("trace.h5"), format: DynFormatOpt = DynFormat.table, output: OutputJson = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune MODEL's backbone with a fresh head by one method, recording per step the loss, accuracy,
    learning rate, per-layer gradient norms (RIFLE Fig. 2), head-input variance (ENTAME Fig. 1) and noise
    fraction; the eval split is scored after each of the first --window steps and every --eval-every steps.

    Example: ftdoctor trace model.pt --data cifar10 --method entame --steps 200 -o trace.h5
    """
    from ftdoctor.dynamics import render_trace, trace as run_trace, write_hdf5
    progress.set_quiet(quiet)
    opts = _trace_options(method=method.value, steps=steps, optimizer=optimizer.value, lr=lr,
                          momentum=momentum, batch_size=batch_size, seed=seed, eval_every=eval_every,
                          window=window, warmup_steps=warmup_steps, rifle_period=rifle_period,
                          rifle_init=rifle_init.value, alpha=alpha, beta=beta, phi_w=phi_w, lam=lam, head=head)
    mopts = model_options(arch, num_classes, trust_checkpoint, non_strict, device)
    dopts = data_options(data, data_root, download, split, max_samples, batch_size, image_size, normalize,
                         workers, seed)
    from ftdoctor.outputs import sidecar_path
    with writes((hdf5, "--hdf5", True), (output, "--output", True), (save, "--save", False),
                (sidecar_path(save) if save else None, "--save's sidecar", False),
                inputs=(model, *data_inputs(data, data_root)), force=force):
        result = run_trace(model, model=mopts, data=dopts, options=opts, eval_split=eval_split.value,
                           eval_samples=eval_samples, save=save, force=force)
        if hdf5 is not None:
            write_hdf5(hdf5, result)
        emit_json(result.to_json(), output, format == DynFormat.json)
    if format == DynFormat.table:
        render_trace(result, console())
        if hdf5 is not None:
            console().print(f"curves written to {hdf5} (draw them: ftdoctor plot {hdf5} -o trace.png)")
        if save is not None:
            console().print(f"fine-tuned checkpoint written to {save}")
        print_notes(list(result.notes), quiet)


@app.command()
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
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    data_root: DataRoot = None, download: Download = False, split: SplitOpt = Split.train,
    max_samples: MaxSamples = 1024, batch_size: BatchSize = 64, image_size: ImageSize = None,
    normalize: NormalizeOpt = Normalize.imagenet, workers: Workers = 0, seed: Seed = 0,
    hdf5: Hdf5Out = Path("compare.h5"), format: DynFormatOpt = DynFormat.table, output: OutputJson = None,
    quiet: Quiet = False,
) -> None:
    """Several methods × seeds from identical starting weights and batches: mean eval accuracy over the first
    --window steps ± 95% CI, the paired difference to the first method with its p-value, and the final
    accuracy (ENTAME Table 3). All curves go to the HDF5 file.

    Example: ftdoctor compare model.pt --data cifar10 --methods base,warmup,entame,entame-fn --seeds 5
    """
    from ftdoctor.dynamics import compare as run_compare, render_compare, write_hdf5
    progress.set_quiet(quiet)
    opts = _trace_options(method="base", steps=steps, optimizer=optimizer.value, lr=lr, momentum=momentum,
                          batch_size=batch_size, seed=seed, eval_every=eval_every, window=window,
                          warmup_steps=warmup_steps, rifle_period=rifle_period, rifle_init=rifle_init.value,
                          alpha=alpha, beta=beta, phi_w=phi_w, lam=lam, head=head)
    mopts = model_options(arch, num_classes, trust_checkpoint, non_strict, device)
    dopts = data_options(data, data_root, download, split, max_samples, batch_size, image_size, normalize,
                         workers, seed)
    with writes((hdf5, "--hdf5", True), (output, "--output", True), inputs=(model, *data_inputs(data, data_root))):
        result = run_compare(model, model=mopts, data=dopts, options=opts, methods=_csv(methods) or (),
                             seeds=seeds, eval_split=eval_split.value, eval_samples=eval_samples)
        if hdf5 is not None:
            write_hdf5(hdf5, result)
        emit_json(result.to_json(), output, format == DynFormat.json)
    if format == DynFormat.table:
        render_compare(result, console())
        if hdf5 is not None:
            console().print(f"curves written to {hdf5} (draw them: ftdoctor plot {hdf5} -o compare.png)")
        print_notes(list(result.notes), quiet)


@app.command()
def plot(
    file: Annotated[Path, typer.Argument(help="An HDF5 file from trace, compare or probe --hdf5.",
                                         show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--output", help="Picture to write (.png, .pdf or .svg).",
                                      show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Pictures of a trace/compare file (accuracy and loss curves with seed bands, layer × step gradient-norm
    heat map, head-input variance) or of a probe file (per-layer change rate and gradient norm bars, R² box
    plots per layer — the L2-SP Fig. 4 view). Needs the plot extra: pip install 'ftdoctor[plot]'.
    """
    from ftdoctor.report.plot import plot as draw
    with writes((out, "-o", True), inputs=(file,)):
        written = draw(file, out)
    if not quiet:
        console().print(f"picture written to {written}")


# -- fix -----------------------------------------------------------------------------------------
FIX_PANEL = "Fix (every method)"
ENTAME_PANEL, RIFLE_PANEL, RESCALE_PANEL, DATADEP_PANEL = ("--method entame", "--method rifle",
                                                           "--method rescale", "--method datadep")


class FixFormat(str, Enum):
    table = "table"
    json = "json"


class _FixCommand(typer.core.TyperCommand):
    """Fills the list of registered fix methods into the help when (and only when) help is shown,
    so that starting the CLI does not import torch."""

    def format_help(self, ctx, formatter):  # type: ignore[override]
        from ftdoctor.fixes import FIXES
        listing = "\n\n".join(f"[bold]{name}[/bold] — {cls.summary} ({cls.paper})" for name, cls in FIXES.items())
        if "Methods:" not in (self.help or ""):
            self.help = (self.help or "") + "\n\nMethods:\n\n" + listing
        for param in self.params:
            if param.name == "method":
                param.help = "One of: " + ", ".join(FIXES) + "."
        return super().format_help(ctx, formatter)


def _only_for(method: str, owner: str, given: dict[str, object]) -> None:
    stray = [flag for flag, value in given.items() if value not in (None, False)]
    if method != owner and stray:
        raise FtdoctorError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to --method {owner} only",
                            f"drop {' '.join(stray)} or use --method {owner}")


@app.command(cls=_FixCommand)
def fix(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="The fix to apply.", show_default=False,
                                        rich_help_panel=FIX_PANEL)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the fixed checkpoint (same format as "
                                      "the input; never the input itself).", show_default=False,
                                      rich_help_panel=FIX_PANEL)],
    data: Annotated[str, typer.Option(
        "--data", help="The data the fix is measured and verified on: shapes[:C], fake, cifar10, ..., a "
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
    arch: Arch = None, num_classes: NumClasses = None, head: Head = None, trust_checkpoint: Trust = False,
    non_strict: NonStrict = False, device: Device = "cpu",
    data_root: DataRoot = None, download: Download = False, split: SplitOpt = Split.train,
    max_samples: MaxSamples = 1024, batch_size: BatchSize = 64, image_size: ImageSize = None,
    normalize: NormalizeOpt = Normalize.imagenet, workers: Workers = 0, seed: Seed = 0,
    format: Annotated[FixFormat, typer.Option("--format", help="table, or json (the sidecar record).",
                                              rich_help_panel=OUTPUT_PANEL)] = FixFormat.table,
    quiet: Quiet = False,
) -> None:
    """Write a repaired checkpoint: apply one method, verify it on the data, and save it in the input's
    format (never over the input), with a sidecar OUT.ftdoctor.json. A failed verification exits 1 and
    writes nothing.

    Example: ftdoctor fix model.pt --method entame --data shapes:5 --new-head -o model_entame.pt
    """
    from ftdoctor.fixes import (FIXES, DatadepOptions, EntameOptions, RescaleOptions, RifleOptions, FixFailed,
                                fix as run_fix)
    from ftdoctor.fixes.render import render
    progress.set_quiet(quiet)
    if method not in FIXES:
        raise FtdoctorError(f"unknown --method {method!r}", f"use one of {', '.join(FIXES)}")
    _only_for(method, "entame", {"--phi-w": phi_w, "--lr": lr, "--lam": lam, "--feature-norm": feature_norm})
    _only_for(method, "rifle", {"--init": init})
    _only_for(method, "rescale", {"--solver": solver, "--damping": damping, "--target-spread": target_spread,
                                  "--max-iterations": max_iterations, "--samples": samples})
    _only_for(method, "datadep", {"--layers": layers, "--beta": beta})
    options = {
        "entame": lambda: EntameOptions(phi_w=phi_w, lr=lr, lam=lam, feature_norm=feature_norm),
        "rifle": lambda: RifleOptions(init=init or "torch-default"),
        "rescale": lambda: RescaleOptions(solver=solver or "joint", damping=0.25 if damping is None else damping,
                                          target_spread=1.2 if target_spread is None else target_spread,
                                          max_iterations=max_iterations, samples=samples),
        "datadep": lambda: DatadepOptions(layers=_csv(layers), beta=0.0 if beta is None else beta),
    }.get(method, lambda: None)()
    from ftdoctor.outputs import sidecar_path
    try:
        with writes((out, "-o", False), (sidecar_path(out), "-o's sidecar", False),
                    inputs=(model, *data_inputs(data, data_root)), force=force):
            result = run_fix(model, method, out=out, options=options, head=head, new_head=new_head, seed=seed,
                             force=force, model=model_options(arch, num_classes, trust_checkpoint, non_strict,
                                                              device),
                             data=data_options(data, data_root, download, split, max_samples, batch_size,
                                               image_size, normalize, workers, seed))
    except FixFailed as exc:
        if format == FixFormat.json:
            emit_json(exc.result.record(), None, True)
        else:
            render(exc.result, console(), notes=not quiet)
        raise
    if format == FixFormat.json:
        emit_json(result.record(), None, True)
    else:
        render(result, console(), notes=not quiet)


# -- demo ----------------------------------------------------------------------------------------
@app.command()
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


# -- entry point ---------------------------------------------------------------------------------
def _fail(cause: str, remedy: str, code: int) -> None:
    from rich.markup import escape
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {escape(cause)}", soft_wrap=True)
    err.print(f"[bold]hint:[/] {escape(remedy)}", soft_wrap=True)
    sys.exit(code)


def _interrupted(exc: BaseException) -> None:
    """Ctrl-C or SIGTERM: say truthfully what was kept (outputs are rolled back unless already complete)."""
    import signal

    from ftdoctor.outputs import Terminated, committed, received_signal
    kept = committed()
    # typer hands Ctrl-C back as the value 130: the signal handler remembers which signal it was
    term = isinstance(exc, Terminated) or received_signal() == signal.SIGTERM
    signame, code = ("SIGTERM", 143) if term else ("Ctrl-C", 130)
    if kept:
        _fail(f"interrupted ({signame}) after the outputs were complete: {', '.join(map(str, kept))}",
              "they are whole; nothing else was written", code)
    _fail(f"interrupted ({signame})", "nothing was written; run the command again", code)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    """Console entry point: run the app, map errors to SPEC exit codes."""
    keep_freed_memory()   # large per-batch tensors reused without page faults (glibc; see allocator.py)
    from ftdoctor.outputs import start_command
    start_command()   # SIGTERM unwinds like Ctrl-C: partial outputs are rolled back
    try:
        code = app(standalone_mode=False)
        if code == 130:  # without standalone mode typer returns Ctrl-C as the value 130 instead of raising
            _interrupted(KeyboardInterrupt())
        if isinstance(code, int) and code:
            sys.exit(code)
    except FtdoctorError as exc:
        if _state["debug"]:
            raise
        _fail(exc.cause, exc.remedy, exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _interrupted(KeyboardInterrupt())
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # click usage errors and anything unforeseen
        try:
            from click import exceptions as click_exceptions
        except ImportError:  # typer >= 0.2x vendors click instead of depending on it
            from typer._click import exceptions as click_exceptions
        if isinstance(exc, click_exceptions.UsageError):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click_exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _fail(f"unexpected {type(exc).__name__}: {first}",
              "rerun with --debug for the traceback and report it if the input looks valid", 2)
    sys.exit(0)
