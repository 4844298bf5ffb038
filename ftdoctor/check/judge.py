"""Judging one checkpoint: the planned checks in order, each a :class:`~.results.CheckResult`.

``pickle_safe`` comes first: every pickle of the checkpoint is scanned before anything is loaded
(:mod:`ftdoctor.checkpoint.pickle_scan`), and a checkpoint that fails it is not loaded at all. The
data-free checks follow (``loadable``, ``require_finite``,
``head_found``, ``expect_num_classes``, ``max_drift_rel``); with data,
``runs_on_data`` and then every threshold key a probe owns
(``Probe.thresholds``), decided by that probe's :meth:`~ftdoctor.probes.base.Probe.judge`
— the same rule its findings use. A check that could not run because an earlier
one failed is reported with ``passed = None`` and says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ftdoctor.check.results import CheckpointVerdict, CheckResult
from ftdoctor.errors import DataError, FtdoctorError
from ftdoctor.probes import PROBES
from ftdoctor.probes.drift import drift_figures
from ftdoctor.probes.verdicts import RunArgs, Verdict, check_message
from ftdoctor.data.subset import describe
from ftdoctor.thresholds import Thresholds


def data_check_keys() -> tuple[str, ...]:
    """The thresholds the data-probes judge, in report order (the probes' order)."""
    return tuple(k for n in PROBES.names() if PROBES[n].needs_data for k in PROBES[n].thresholds)


def probe_of(key: str) -> str:
    return next(n for n, p in PROBES.items() if key in p.thresholds)


def planned_checks(thresholds: Thresholds, *, with_data: bool, with_reference: bool) -> list[str]:
    """The checks every checkpoint gets, in report order (``pickle_safe`` always: off, it says so)."""
    names = ["pickle_safe", "loadable"]
    if thresholds.require_finite:
        names.append("require_finite")
    names.append("head_found")
    if thresholds.expect_num_classes is not None:
        names.append("expect_num_classes")
    if with_reference and thresholds.max_drift_rel is not None:
        names.append("max_drift_rel")
    if with_data:
        names.append("runs_on_data")
        for key in data_check_keys():
            if getattr(thresholds, key) is None or (key == "min_r2_median" and not with_reference):
                continue
            names.append(key)
    return names


def probes_needed(thresholds: Thresholds, *, with_reference: bool) -> tuple[str, ...]:
    """Only the probes the enabled data checks read (drift is computed without data)."""
    names = []
    for key in data_check_keys():
        if getattr(thresholds, key) is None or (key == "min_r2_median" and not with_reference):
            continue
        if probe_of(key) not in names:
            names.append(probe_of(key))
    return tuple(names)


def nonfinite_tensors(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """(name, NaN count, Inf count, elements) of every floating parameter or buffer that is not finite."""
    out = []
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            nan = int(torch.isnan(t.detach()).sum())
            out.append((name, nan, int(bad.sum()) - nan, int(t.numel())))
    return out


def finite_check(model: nn.Module) -> CheckResult:
    bad = nonfinite_tensors(model)
    if not bad:
        return CheckResult("require_finite", True, 0, True, "every parameter and buffer is finite")
    parts = []
    for name, nan, inf, n in bad[:5]:
        kinds = " and ".join(k for k, c in (("NaN", nan), ("Inf", inf)) if c)
        parts.append(f"{name} ({nan + inf} of {n} values {kinds})")
    more = f" and {len(bad) - 5} more tensor(s)" if len(bad) > 5 else ""
    total = sum(nan + inf for _, nan, inf, _ in bad)
    return CheckResult("require_finite", False, total, True,
                       f"NaN or Inf in {', '.join(parts)}{more}: the checkpoint is corrupt or training "
                       f"diverged; re-export it from a good step")


def pickle_check(scan: Any, enabled: bool, config: str | None) -> CheckResult:
    """``pickle_safe``: fails when a pickle of the checkpoint names a global that can act; the value is how many.
    Off (``pickle_safe = false`` in the config), it is reported as not run, with what the scan found."""
    unsafe = len(scan.unsafe)
    if not enabled:
        where = config or "the thresholds given"
        return CheckResult("pickle_safe", None, unsafe, False,
                           f"off (pickle_safe = false in {where}): not judged; the scan found {scan.summary()}")
    if unsafe:
        return CheckResult("pickle_safe", False, unsafe, True,
                           f"{scan.summary()}. Whoever loads this file with full unpickling (torch.load with "
                           "weights_only=False, older Lightning, many training scripts) runs them, so it was not "
                           "loaded (hint: rebuild the file from a trusted copy of the weights, e.g. "
                           "torch.save(model.state_dict(), PATH) or .safetensors)")
    return CheckResult("pickle_safe", True, 0, True, scan.summary())


def as_result(v: Verdict, run: RunArgs) -> CheckResult:
    return CheckResult(v.key, v.passed, v.value, v.threshold, check_message(v, run))


def describe_storage(loaded: Any) -> str:
    """How a checkpoint is stored, in words: "safetensors checkpoint", "Hugging Face folder (model.safetensors)"."""
    folder = loaded.container.folder
    return folder.describe()[2:] if folder is not None else f"{loaded.format} checkpoint"


@dataclass
class _Shared:
    """What one run loads once and reuses across checkpoints: data per input-channel count,
    reference models per architecture."""

    data: Any
    reference: str | Path | None
    model_opts: Any
    bundles: dict[Any, Any] = field(default_factory=dict)
    references: dict[str | None, nn.Module] = field(default_factory=dict)
    new_head: bool = False
    config: str | None = None       # where the thresholds came from (named when pickle_safe is off)

    def run_args(self, path: Path, model_opts: Any = None) -> RunArgs:
        """What a suggested command repeats for this checkpoint."""
        return RunArgs.of(path, model_opts or self.model_opts, self.data, self.new_head)

    def bundle(self, loaded: Any) -> Any:
        """The data as this checkpoint's model takes it (its input channels and size); shared by the
        checkpoints that take it alike."""
        from ftdoctor.session import text_context, first_in_channels, model_input_size, open_data
        size = model_input_size(loaded)
        key = (first_in_channels(loaded.model), size, tuple(sorted((k, str(v)) for k, v in
                                                                   text_context(loaded).items())))
        if key not in self.bundles:
            self.bundles[key] = open_data(loaded, self.data, size)
        return self.bundles[key]

    def reference_model(self, loaded: Any) -> nn.Module:
        from ftdoctor.session import load_reference
        arch = loaded.arch if loaded.format in ("state_dict", "safetensors") else self.model_opts.arch
        if arch not in self.references:
            try:
                self.references[arch] = load_reference(self.reference, loaded, self.model_opts)
            except FtdoctorError as exc:
                raise FtdoctorError(f"the reference {self.reference} cannot be used: {exc.cause}",
                                    exc.remedy) from None
        return self.references[arch]


def _skipped(names: Iterable[str], reason: str, t: Thresholds) -> list[CheckResult]:
    return [CheckResult(n, None, None, _threshold_of(n, t), f"not run: {reason}") for n in names]


def _threshold_of(name: str, t: Thresholds) -> Any:
    return getattr(t, name) if name in Thresholds.keys() else None


def _file_digest(path: Path) -> str | None:
    """The sha256 of a checkpoint file that was scanned but not loaded (a CI log can name the very file)."""
    from ftdoctor.checkpoint.common import sha256_file
    try:
        return sha256_file(path) if path.is_file() else None
    except (OSError, FtdoctorError):
        return None


def _error_text(exc: FtdoctorError) -> str:
    return f"{exc.cause} (hint: {exc.remedy})"


def judge(path: Path, *, model_opts: Any, thresholds: Thresholds, shared: _Shared, plan: Sequence[str],
          head: str | None = None, new_head: bool = False, head_init: str = "kaiming", seed: int = 0,
          image_size: int | None = None) -> CheckpointVerdict:
    """Run the planned checks on one checkpoint; only configuration problems raise."""
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.checkpoint.pickle_scan import scan_checkpoint
    from ftdoctor.model import find_head
    from ftdoctor.session import ModelCannotTakeData, find_layers, install_new_head, with_head

    t = thresholds
    results: dict[str, CheckResult] = {}

    def done(**info: Any) -> CheckpointVerdict:
        rest = [n for n in plan if n not in results]
        ordered = [results[n] for n in plan if n in results]
        # anything not reached was skipped by an earlier failure; say which
        failed = next((r.name for r in ordered if r.passed is False), None)
        reason = f"{failed} failed" if failed else "not measured"
        by_name = {r.name: r for r in ordered + _skipped(rest, reason, t)}
        return CheckpointVerdict(str(path), tuple(by_name[n] for n in plan), **info)

    scan = scan_checkpoint(path)
    results["pickle_safe"] = pickle_check(scan, t.pickle_safe, shared.config)
    if results["pickle_safe"].passed is False and (scan.acting or model_opts.trust_checkpoint):
        return done(pickle_scan=scan, sha256=_file_digest(path))   # never loaded: that is what it guards against
    # (a damaged pickle alone is read as far as weights_only or the inert reader go: loadable says why not)
    try:
        loaded = ckpt.load_model(path, model_opts, scan=scan)
    except FtdoctorError as exc:
        results["loadable"] = CheckResult("loadable", False, False, None, _error_text(exc))
        return done(pickle_scan=scan)
    net = loaded.model
    results["loadable"] = CheckResult("loadable", True, True, None,
                                      f"{describe_storage(loaded)}, architecture {loaded.arch or 'unknown'}")
    info = {"sha256": loaded.sha256, "arch": loaded.arch, "pickle_scan": scan}
    finite = True
    if "require_finite" in plan:
        results["require_finite"] = finite_check(net)
        finite = bool(results["require_finite"].passed)

    device = torch.device(model_opts.device)
    layers = None
    order_error: str | None = None
    bundle = None
    if "runs_on_data" in plan:
        try:
            bundle = shared.bundle(loaded)
        except ModelCannotTakeData as exc:   # this model cannot take the data: its failure, not the data's
            results["runs_on_data"] = CheckResult("runs_on_data", False, None, None, _error_text(exc))
            return done(**info)
        try:
            layers, _ = find_layers(net, bundle, device=device)
        except DataError:
            raise
        except FtdoctorError as exc:       # the model's forward fails on this data: this checkpoint's failure
            order_error = _error_text(exc)
    if layers is None:
        layers, _ = find_layers(net, image_size=image_size)

    try:
        head_layer = find_head(layers, head)
        outputs = int(head_layer.weight.shape[0])
        results["head_found"] = CheckResult("head_found", True, head_layer.name, None,
                                            f"head {head_layer.name} ({head_layer.kind}, {outputs} outputs)")
    except FtdoctorError as exc:
        head_layer = None
        results["head_found"] = CheckResult("head_found", False, None, None, _error_text(exc))

    if "expect_num_classes" in plan and head_layer is not None:
        want = t.expect_num_classes
        ok = outputs == want
        results["expect_num_classes"] = CheckResult(
            "expect_num_classes", ok, outputs, want,
            f"head {head_layer.name} has {outputs} outputs" + ("" if ok else f", expected {want} classes"))

    if "max_drift_rel" in plan:
        if not finite:
            results.update({r.name: r for r in _skipped(["max_drift_rel"], "the weights are not finite "
                                                        "(require_finite failed)", t)})
        else:
            reference = shared.reference_model(loaded)
            verdict = PROBES["drift"].judge(drift_figures(layers, dict(reference.named_modules())), t)[0]
            results["max_drift_rel"] = as_result(verdict, shared.run_args(path, model_opts))

    if "runs_on_data" not in plan:
        return done(**info)
    data_checks = [n for n in plan if n in data_check_keys()]
    if not finite:
        results.update({r.name: r for r in _skipped(["runs_on_data", *data_checks],
                                                   "the weights are not finite (require_finite failed)", t)})
        return done(**info)
    if head_layer is None:
        results.update({r.name: r for r in _skipped(["runs_on_data", *data_checks],
                                                   "no head (head_found failed)", t)})
        return done(**info)
    if order_error is not None:
        results["runs_on_data"] = CheckResult("runs_on_data", False, None, None, order_error)
        return done(**info)
    classes = int(bundle.num_classes)
    if new_head:
        try:
            head_layer = install_new_head(net, head_layer, classes, head_init, seed)
        except FtdoctorError as exc:
            results["runs_on_data"] = CheckResult("runs_on_data", False, None, None, _error_text(exc))
            return done(**info)
        layers = with_head(layers, head_layer)
    elif outputs != classes:
        results["runs_on_data"] = CheckResult(
            "runs_on_data", False, None, None,
            f"head {head_layer.name} has {outputs} outputs but the data has {classes} classes, so the "
            f"noise and gradient checks cannot score its predictions (hint: to judge how this backbone will "
            f"fine-tune on the data, pass --new-head (a fresh head for the data's classes, ENTAME's setting); "
            f"to gate the class count itself, set expect_num_classes)")
        return done(**info)

    from ftdoctor.diagnose import ProbeOptions, probe_model
    names = probes_needed(t, with_reference=shared.reference is not None)
    figures: dict[str, Any] = {}
    samples = 0
    if names:
        opts = ProbeOptions(probes=names, head=head_layer.name, new_head=new_head, head_init=head_init,
                            seed=seed, thresholds=t)
        ref = shared.reference_model(loaded) if "r2" in names else None
        try:
            run = probe_model(net, bundle, opts, reference=ref, device=device, layers=layers,
                              description=f"checking {path.name}")
        except DataError:
            raise              # the data is unusable: exit 2, not a failure of this checkpoint
        except FtdoctorError as exc:
            results["runs_on_data"] = CheckResult("runs_on_data", False, None, None, _error_text(exc))
            return done(**info)
        figures = {n: r.figures for n, r in run.results.items()}
        samples = run.num_samples
    ran = (describe(bundle.drawn.to_json() if bundle.drawn else None, samples) if names else "a batch")
    results["runs_on_data"] = CheckResult(
        "runs_on_data", True, samples, None,
        f"ran on {bundle.name} ({bundle.split}): {ran}, {classes} classes"
        + (f", fresh {head_init} head" if new_head else ""))
    for name, figs in figures.items():      # each probe's own judgement rule (the one its findings use)
        for verdict in PROBES[name].judge(figs, t):
            if verdict.key in data_checks:
                results[verdict.key] = as_result(verdict, shared.run_args(path, model_opts))
    return done(**info)
