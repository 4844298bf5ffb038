"""``trace`` and ``compare`` as library calls: load (:mod:`ftdoctor.session`), fine-tune, report, write."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import ftdoctor
from ftdoctor import progress
from ftdoctor.dynamics.finetune import Examples, fine_tune
from ftdoctor.dynamics.options import METHODS, SCHEMA, TraceOptions
from ftdoctor.dynamics.series import CompareResult, MethodSummary, RunSeries, TraceResult, check_paired, summarise
from ftdoctor.errors import FtdoctorError
from ftdoctor.model import AffineLayer, find_head, is_scripted


def _setup(template: nn.Module, train_bundle: Any, eval_bundle: Any, head_name: str | None,
           device: torch.device) -> tuple[list[AffineLayer], AffineLayer, Examples, Examples]:
    if is_scripted(template):
        raise FtdoctorError("a TorchScript model cannot be fine-tuned with a new head",
                            "pass the eager checkpoint (state dict) with --arch")
    train, evaluation = Examples(train_bundle, device), Examples(eval_bundle, device)
    if train.num_samples == 0 or evaluation.num_samples == 0:
        raise FtdoctorError("the training or evaluation data is empty", "check --data, --split and --max-samples")
    from ftdoctor.session import find_layers
    layers, _ = find_layers(template, train_bundle, device=device)
    head = find_head(layers, head_name)
    return layers, head, train, evaluation


def trace_model(template: nn.Module, train_bundle: Any, eval_bundle: Any, options: TraceOptions
                ) -> tuple[RunSeries, nn.Module]:
    """``trace`` on an in-memory pretrained model (left unchanged) and data bundles."""
    options.validate()
    device = next(iter(template.parameters())).device
    layers, head, train, evaluation = _setup(template, train_bundle, eval_bundle, options.head, device)
    with progress.task(f"trace {options.method}", options.steps, "steps") as bar:
        return fine_tune(template, head, layers, train, evaluation, train_bundle.num_classes, options, bar=bar)


def compare_model(template: nn.Module, train_bundle: Any, eval_bundle: Any, options: TraceOptions,
                  methods: Sequence[str], seeds: int) -> tuple[tuple[MethodSummary, ...], tuple[RunSeries, ...]]:
    """``compare`` on an in-memory pretrained model: methods × seeds, paired by seed."""
    methods = tuple(methods)
    if not methods:
        raise FtdoctorError("no method to compare", f"pass --methods with some of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise FtdoctorError("a method is listed twice in --methods", "list each method once")
    if seeds < 1:
        raise FtdoctorError(f"--seeds must be at least 1, got {seeds}", "pass --seeds K with K >= 1")
    options.validate(methods)
    device = next(iter(template.parameters())).device
    layers, head, train, evaluation = _setup(template, train_bundle, eval_bundle, options.head, device)
    runs: list[RunSeries] = []
    total = len(methods) * seeds * options.steps
    with progress.task("compare", total, "steps") as bar:
        for s in range(options.seed, options.seed + seeds):
            for m in methods:
                bar.describe(f"compare {m} seed {s}")
                series, _ = fine_tune(template, head, layers, train, evaluation, train_bundle.num_classes,
                                      options, method=m, seed=s, bar=bar)
                runs.append(series)
    check_paired(runs)
    return summarise(runs, methods, options.window), tuple(runs)


def _load(model_path: str | Path, model_opts: Any, data: Any, eval_split: str, eval_samples: int
          ) -> tuple[Any, Any, Any, list[str]]:
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.session import model_input_size, open_data
    model_opts = model_opts or ckpt.ModelOptions()
    loaded = ckpt.load_model(model_path, model_opts)
    notes = list(loaded.notes)
    size = model_input_size(loaded)
    train_bundle = open_data(loaded, data, size)
    try:
        eval_bundle = open_data(loaded, replace(data, split=eval_split, max_samples=eval_samples), size)
    except FtdoctorError as exc:
        if "holds one split" not in exc.cause:
            raise
        raise FtdoctorError(f"{data.data} holds one split, so there is no {eval_split} split to evaluate on",
                            f"pass --eval-split {data.split} to evaluate on the training examples") from None
    notes.extend(train_bundle.notes)
    if eval_bundle.num_classes != train_bundle.num_classes:
        raise FtdoctorError(f"the {eval_split} split has {eval_bundle.num_classes} classes but the "
                            f"{train_bundle.split} split has {train_bundle.num_classes}",
                            "use an evaluation split with the same classes")
    return loaded, train_bundle, eval_bundle, notes


def _info(loaded: Any, train_bundle: Any, eval_bundle: Any, head: str | None) -> tuple[dict, dict]:
    from ftdoctor.session import model_info
    model = {**model_info(loaded, None), "head": head}
    data = {**train_bundle.info(), "eval_split": eval_bundle.split, "eval_samples": eval_bundle.num_samples}
    return model, data


def trace(model_path: str | Path, *, model: Any = None, data: Any, options: TraceOptions = TraceOptions(),
          eval_split: str = "test", eval_samples: int = 512, save: str | Path | None = None,
          force: bool = False, hdf5: str | Path | None = None, output: str | Path | None = None,
          html: str | Path | None = None) -> TraceResult:
    """``ftdoctor trace``: fine-tune MODEL's backbone with a fresh head by one method, recording the dynamics.

    With ``save`` the fine-tuned checkpoint is written in the input's format (with a sidecar
    ``OUT.ftdoctor.json``); ``hdf5`` gets the series (SPEC §3 layout), ``output`` the JSON figures, ``html``
    the self-contained page (:mod:`ftdoctor.report.html`). All
    are checked against the inputs before the run and kept together or not at all.
    """
    options.validate()
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal, sidecar_path
    outputs = [Output(Path(p), flag, replace) for p, flag, replace in (
        (hdf5, "--hdf5", True), (output, "--output", True), (html, "--html", True), (save, "--save", False),
        (sidecar_path(save) if save is not None else None, "--save's sidecar", False)) if p is not None]
    with journal(outputs, (model_path, *input_paths(data.data, data.data_root)), force=force):
        result = _trace(model_path, model, data, options, eval_split, eval_samples, save, force)
        _write(result, hdf5, output, html)
    return result


def _write(result: TraceResult | CompareResult, hdf5: str | Path | None, output: str | Path | None,
           html: str | Path | None = None) -> None:
    from ftdoctor.report import write_files
    if hdf5 is not None:
        write_hdf5(hdf5, result)
    write_files(result, (("json", output), ("html", html)))


def _trace(model_path: str | Path, model: Any, data: Any, options: TraceOptions, eval_split: str,
           eval_samples: int, save: str | Path | None, force: bool) -> TraceResult:
    from ftdoctor import checkpoint as ckpt
    loaded, train_bundle, eval_bundle, notes = _load(model_path, model, data, eval_split, eval_samples)
    run, tuned = trace_model(loaded.model, train_bundle, eval_bundle, options)
    minfo, dinfo = _info(loaded, train_bundle, eval_bundle, None)
    layers_head = run.head
    minfo["head"] = layers_head
    settings = {"method": options.method, **options.settings(), "eval_split": eval_split,
                "eval_samples": eval_samples, "eval_points": options.eval_points()}
    if options.method == "entame-fn":
        notes.append(f"the head {layers_head} normalises its input first (ENTAME eq. 20): a saved checkpoint "
                     f"carries the buffers {layers_head}.feature_norm.mean/var")
    if save is not None:
        saved = ckpt.save_model(loaded, tuned, Path(save), force=force, notes=notes)
    result = TraceResult(minfo, dinfo, settings, run, tuple(notes))
    if save is not None:
        ckpt.write_sidecar(Path(save), {
            "command": "trace", "method": options.method, "parameters": settings, "seed": options.seed,
            "input": {"path": str(loaded.path), "sha256": loaded.sha256}, "output": {"sha256": saved.sha256},
            "pickle_scan": {"input": loaded.scan.to_json() if loaded.scan is not None else None,
                            "output": saved.scan.to_json()},
            "versions": {"ftdoctor": ftdoctor.__version__, "torch": torch.__version__.split("+")[0]},
            "final": run.final(options.window)})
    return result


def compare(model_path: str | Path, *, model: Any = None, data: Any, options: TraceOptions = TraceOptions(),
            methods: Sequence[str] = ("base", "entame"), seeds: int = 5, eval_split: str = "test",
            eval_samples: int = 512, hdf5: str | Path | None = None,
            output: str | Path | None = None, html: str | Path | None = None) -> CompareResult:
    """``ftdoctor compare``: methods × seeds from identical starts and batches, ENTAME Table 3 style; ``hdf5``
    gets every run's series, ``output`` the JSON table, ``html`` the self-contained page (checked against
    the inputs first, all or none)."""
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal
    outputs = [Output(Path(p), flag) for p, flag in ((hdf5, "--hdf5"), (output, "--output"), (html, "--html"))
               if p is not None]
    with journal(outputs, (model_path, *input_paths(data.data, data.data_root))):
        result = _compare(model_path, model=model, data=data, options=options, methods=methods, seeds=seeds,
                          eval_split=eval_split, eval_samples=eval_samples)
        _write(result, hdf5, output, html)
    return result


def _compare(model_path: str | Path, *, model: Any, data: Any, options: TraceOptions, methods: Sequence[str],
             seeds: int, eval_split: str, eval_samples: int) -> CompareResult:
    options.validate(methods)
    loaded, train_bundle, eval_bundle, notes = _load(model_path, model, data, eval_split, eval_samples)
    rows, runs = compare_model(loaded.model, train_bundle, eval_bundle, options, methods, seeds)
    minfo, dinfo = _info(loaded, train_bundle, eval_bundle, runs[0].head)
    settings = {"methods": list(methods), **options.settings(), "eval_split": eval_split,
                "eval_samples": eval_samples, "eval_points": options.eval_points()}
    settings.pop("seed")
    settings["first_seed"] = options.seed
    if options.steps < options.window:
        notes.append(f"--steps {options.steps} is shorter than --window {options.window}: the early accuracy "
                     f"averages all {options.steps} steps")
    return CompareResult(minfo, dinfo, settings, options.window, options.steps,
                         tuple(range(options.seed, options.seed + seeds)), rows, runs, tuple(notes))


def write_hdf5(path: str | Path, result: TraceResult | CompareResult) -> None:
    """The trace/compare HDF5 file (SPEC §3): ``schema = ftdoctor.trace/1``, ``/runs/<method>/seed_<s>/...``."""
    from ftdoctor.report import hdf5 as hdf5_report
    hdf5_report.write(path, SCHEMA, result.to_json(), result.arrays(), result.attrs())
