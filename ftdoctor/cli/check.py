"""``ftdoctor check``: parse, call the library, render; exit 0 all passed, 1 a check failed, 2 unusable input."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ftdoctor import progress
from ftdoctor.cli.app import app, docs_page, console, output_format, print_page_written
from ftdoctor.cli.shared import (DATA_PANEL, OUTPUT_PANEL, PROBE_PANEL, DataFlags, Head, HeadInit, HtmlOut, Quiet,
                                 Seed, data_options, model_options)

THRESHOLD_PANEL = "Thresholds (override \\[tool.ftdoctor.check]; 'off' disables a check)"


def _threshold(key: str, help: str) -> Any:
    return Annotated[Optional[str], typer.Option(f"--{key.replace('_', '-')}", metavar="X|off", help=help,
                                                 rich_help_panel=THRESHOLD_PANEL)]


@app.command(epilog=docs_page("check"))
@model_options
@data_options
def check(
    models: Annotated[list[str], typer.Argument(
        help="Checkpoint files, directories (searched for .pt/.pth/.bin/.ckpt/.safetensors/.onnx) or quoted globs.",
        show_default=False)],
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Also run the probe-based checks on this data (shapes[:C], fake, textlines, cifar10, ..., a "
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
    max_noise_fraction: _threshold("max_noise_fraction", "noise: ζ/φ, at least its floor 1/(C−1); Nx (e.g. 2x) is N times "
                                   "the floor, a number is absolute (default 2x: 2 at C=2, 0.5 at C=5, 0.02 at "
                                   "C=101).") = None,
    max_excess_noise_fraction: _threshold("max_excess_noise_fraction", "noise: (ζ − 1/C)/φ, 0 at a maximum-entropy "
                                          "head for every C (default 0.05).") = None,
    max_change_rate_spread: _threshold("max_change_rate_spread", "change_rate: max/min over layers; over the "
                                       "backbone under a maximum-entropy head (default 10).") = None,
    max_change_rate_cv: _threshold("max_change_rate_cv", "change_rate: worst within-layer cv (default 5).") = None,
    min_depth_ratio: _threshold("min_depth_ratio", "grad_norm: first layer / head; / the deepest layer below a "
                                                   "maximum-entropy head (default 0.01).") = None,
    min_r2_median: _threshold("min_r2_median", "r2: lowest per-layer median, needs --reference (default 0.5).")
    = None,
    max_drift_rel: _threshold("max_drift_rel", "drift: largest ‖W−W⁰‖/‖W⁰‖, needs --reference, no data "
                                               "(default 0.5).") = None,
    expect_num_classes: Annotated[Optional[str], typer.Option(
        "--expect-num-classes", metavar="N|off", help="The head must have N outputs (default: not checked).",
        rich_help_panel=THRESHOLD_PANEL)] = None,
    require_finite: Annotated[Optional[bool], typer.Option(
        "--require-finite/--no-require-finite", help="NaN/Inf weights fail (default: on).",
        rich_help_panel=THRESHOLD_PANEL, show_default=False)] = None,
    head: Head = None, seed: Seed = 0,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="text, json, junit, github, markdown or sarif (default: github when GITHUB_ACTIONS=true, "
                         "else text).",
        rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", help="Write the report in --format to FILE (atomically); the terminal then gets the text "
                         "view (github annotations under GitHub Actions).", rich_help_panel=OUTPUT_PANEL)] = None,
    html: HtmlOut = None, quiet: Quiet = False, model_opts: Any = None, data_flags: DataFlags = DataFlags(),
) -> None:
    """CI gate: judge checkpoints against thresholds; exit 0 all passed, 1 any check failed, 2 unusable
    config or input.

    Every pickle in a checkpoint is scanned first: one that names a global that can act (os.system, eval,
    any callable it calls that is not data) fails `pickle_safe` and is never loaded; only a `pickle_safe =
    false` key in the config turns that off. Data-free checks (loadable, require_finite, head_found,
    expect_num_classes, max_drift_rel) always run; the probe checks (noise, change rates, gradient depth,
    R²) run with --data. A checkpoint that cannot be loaded (corrupt, truncated) is a failed `loadable`
    check, exit 1, reported in every format; bad config or flags, no matching checkpoint or an empty
    directory exit 2. Thresholds: the
    \\[tool.ftdoctor.check] table of the nearest pyproject.toml above the working directory, or --config;
    flags win. Checkpoints that cannot be recognised get an architecture from its \\[tool.ftdoctor.check.arch]
    table ("GLOB" = "ARCH"; --arch wins).

    Example: ftdoctor check 'exports/**/*.pt' --data shapes:10 --format junit --output ftdoctor.xml
    """
    from ftdoctor.check import check as run_check
    progress.set_quiet(quiet)
    flags = {"max_noise_fraction": max_noise_fraction, "max_excess_noise_fraction": max_excess_noise_fraction,
             "max_change_rate_spread": max_change_rate_spread, "max_change_rate_cv": max_change_rate_cv,
             "min_depth_ratio": min_depth_ratio, "min_r2_median": min_r2_median, "max_drift_rel": max_drift_rel,
             "expect_num_classes": expect_num_classes, "require_finite": require_finite}
    github = os.environ.get("GITHUB_ACTIONS") == "true"
    name = format or ("github" if github else "text")
    fmt = output_format(name, "check")
    report = run_check(models, model=model_opts, data=data_flags.options(data, seed) if data is not None else None,
                       reference=reference, head=head, new_head=new_head, head_init=head_init.value, seed=seed,
                       image_size=data_flags.image_size, config=config,
                       overrides={k: v for k, v in flags.items() if v is not None}, output=output,
                       output_format=name, html=html)
    if output is None:
        fmt.show(report, console())
    elif not (quiet or name == "text" or (name == "github" and github)):
        # the file holds --format; the terminal gets the view a person (or the Actions runner) reads
        output_format("github" if github else "text", "check").show(report, console())
    print_page_written(html, quiet)
    sys.exit(report.exit_code)  # typer.Exit(1) would come back as a return value of app(standalone_mode=False)
