"""``ftdoctor.fix``: load a checkpoint, apply one method, verify it on the data, write it back.

The same steps for every method (SPEC §2):

1. refuse a bad ``-o`` before any work (the input itself, an existing file
   without ``force``); refuse TorchScript, which cannot be written back;
2. load the model and the data; with ``new_head`` replace a head whose class
   count differs from the data's by a fresh ``Linear(in_features, C)``;
3. the method's ``before`` / ``apply`` / ``verify`` (see :mod:`.base`), plus
   one check common to all: every tensor the method does not own is
   bit-identical;
4. a failed verification raises :class:`FixFailed` (exit 1) and writes nothing;
5. otherwise write the model in the input's format and container, atomically,
   and the sidecar ``OUT.ftdoctor.json``.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

import ftdoctor
from ftdoctor import checkpoint as ckpt
from ftdoctor.errors import FtdoctorError, VerificationFailed
from ftdoctor.fixes.base import FIXES, Check, FixContext, FixOutcome, changed_keys, snapshot
from ftdoctor.featurenorm import FeatureNormLinear

if TYPE_CHECKING:
    from ftdoctor.data import DataOptions

SCHEMA = "ftdoctor.fix/1"


@dataclass
class FixResult:
    """What ``ftdoctor fix`` did: the method's outcome, where it wrote, and the sidecar record."""

    method: str
    outcome: FixOutcome
    input_path: Path
    input_sha256: str
    format: str
    arch: str | None
    head: str
    num_classes: int
    data: dict[str, Any]
    settings: dict[str, Any]
    out: Path | None = None
    output_sha256: str | None = None
    sidecar: Path | None = None
    notes: list[str] = field(default_factory=list)
    input_scan: Any = None        # the pickle scans of the input and the output (ftdoctor.checkpoint.pickle_scan)
    output_scan: Any = None
    kind: ClassVar[str] = "fix"

    @property
    def passed(self) -> bool:
        return self.outcome.passed

    def record(self) -> dict[str, Any]:
        """The sidecar document (JSON-ready)."""
        o = self.outcome
        return {
            "schema": SCHEMA, "method": self.method, "parameters": o.parameters,
            "seed": self.settings.get("seed"), "settings": self.settings,
            "input": {"path": str(self.input_path), "sha256": self.input_sha256, "format": self.format,
                      "arch": self.arch},
            "output": {"path": str(self.out) if self.out else None, "sha256": self.output_sha256,
                       "format": self.format},
            "head": self.head, "num_classes": self.num_classes, "data": self.data,
            "versions": versions(),
            "verification": {"passed": o.passed, "checks": [c.to_json() for c in o.checks], **o.figures},
            "left_alone": [l.to_json() for l in o.left_alone],
            "notes": list(self.notes) + list(o.notes),
            "pickle_scan": {"input": _scan_json(self.input_scan), "output": _scan_json(self.output_scan)},
        }

    to_json = record


def _scan_json(scan: Any) -> dict[str, Any] | None:
    return scan.to_json() if scan is not None else None


class FixFailed(VerificationFailed):
    """The fix did not pass its verification: exit 1, nothing written. ``result`` has the figures."""

    def __init__(self, cause: str, remedy: str, result: FixResult) -> None:
        super().__init__(cause, remedy)
        self.result = result


def versions() -> dict[str, str]:
    out = {"ftdoctor": ftdoctor.__version__, "torch": torch.__version__.split("+")[0],
           "python": platform.python_version()}
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__.split("+")[0]
    except Exception:  # noqa: BLE001 - torchvision is a dependency, but its absence must not stop a fix
        pass
    return out


def method_names() -> list[str]:
    return FIXES.names()


def fix_options(method: str, flags: Mapping[str, Any]) -> Any:
    """The options of ``method`` from command-line flags named like its options' fields.

    Flags left unset (None or False) take the options' own defaults; a set flag that belongs to another
    method's options is an error naming that method.
    """
    if method not in FIXES:
        raise FtdoctorError(f"unknown --method {method!r}", f"use one of {', '.join(FIXES.names())}")
    mine = {f.name for f in dataclass_fields(FIXES[method].options_type)}
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    stray = [k for k in given if k not in mine]
    if stray:
        owner = next((name for name, cls in FIXES.items()
                      if stray[0] in {f.name for f in dataclass_fields(cls.options_type)}), "another")
        shown = [f"--{k.replace('_', '-')}" for k in stray]
        raise FtdoctorError(f"{', '.join(shown)} appl{'ies' if len(shown) == 1 else 'y'} to --method {owner} only",
                            f"drop {' '.join(shown)} or use --method {owner}")
    return FIXES[method].options_type(**given)


def _options_for(method: str, options: Any) -> Any:
    cls = FIXES[method].options_type
    if options is None:
        return cls()
    if isinstance(options, Mapping):
        return fix_options(method, options)
    if not isinstance(options, cls):
        raise TypeError(f"--method {method} takes {cls.__name__}, got {type(options).__name__}")
    return options


def fix(model_path: str | Path, method: str, *, out: str | Path, data: "DataOptions",
        model: "ckpt.ModelOptions | None" = None, options: Any = None, head: str | None = None,
        new_head: bool = False, seed: int = 0, force: bool = False, write: bool = True) -> FixResult:
    """``ftdoctor fix``: apply ``method`` (see :data:`FIXES`) and write the verified checkpoint to ``out``.

    ``options`` is the method's options dataclass (``EntameOptions``,
    ``RifleOptions``, ``RescaleOptions``, ``DatadepOptions``; default: its
    defaults), or a mapping of command-line flags (:func:`fix_options`).
    Raises :class:`FtdoctorError` for unusable input (exit 2) and
    :class:`FixFailed` when the verification fails (exit 1); in both cases
    nothing is written. ``write=False`` verifies without writing (a dry run).
    """
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal, sidecar_path

    if method not in FIXES:
        raise FtdoctorError(f"unknown --method {method!r}", f"use one of {', '.join(FIXES.names())}")
    opts = _options_for(method, options)
    model_path, out = Path(model_path), Path(out)
    from ftdoctor.checkpoint.folder import output_is_folder

    outputs = [Output(out, "-o", replace=False, directory=output_is_folder(model_path)),
               Output(sidecar_path(out), "-o's sidecar", replace=False)]
    # every output checked against every input before any work; all kept, or none (outputs.journal)
    with journal(outputs if write else (), (model_path, *input_paths(data.data, data.data_root)), force=force):
        return _fix(model_path, method, out, data, model, opts, head, new_head, seed, force, write)


def _fix(model_path: Path, method: str, out: Path, data: "DataOptions", model: "ckpt.ModelOptions | None",
         options: Any, head: str | None, new_head: bool, seed: int, force: bool, write: bool) -> FixResult:
    from ftdoctor.session import open_session

    fixer = FIXES[method](options)
    model_opts = model or ckpt.ModelOptions()
    session = open_session(model_path, model_opts, data, head=head, new_head=NEW_HEAD_INIT if new_head else None,
                           seed=seed)
    loaded, net, bundle, layers, head_layer = (session.loaded, session.model, session.data, session.layers,
                                               session.head)
    notes, device = session.notes, session.device
    if loaded.format == "torchscript":
        raise FtdoctorError(
            f"{model_path} is a TorchScript archive: ftdoctor can probe it but cannot write a fixed one",
            "pass the eager checkpoint instead (the state dict with --arch NAME, or a pickled module with "
            "--trust-checkpoint) and script the fixed model afterwards")
    if new_head:
        if isinstance(session.replaced, FeatureNormLinear):
            notes.append(f"the feature norm in front of {head_layer.name} was dropped with the old head")
        notes.append(f"head {head_layer.name} replaced by a fresh {NEW_HEAD_INIT} head for {bundle.num_classes} "
                     f"classes ({session.outputs_before} before): the head `probe --new-head --seed {seed}` measures, "
                     "so the 'before' figures are that probe's")

    from ftdoctor.diagnose import weight_findings
    broken = weight_findings(net)
    if broken:
        raise FtdoctorError(f"the model in {model_path} has {broken[0].message.removeprefix('NaN or Inf in ')} "
                            "with NaN or Inf: a fix cannot repair a diverged or corrupt checkpoint",
                            "re-export the checkpoint from a good training step (ftdoctor inspect lists the "
                            "layers that are not finite)")
    ctx = FixContext(model=net, data=bundle, layers=tuple(layers), head=head_layer,
                     num_classes=bundle.num_classes, seed=seed, device=device)
    fixer.validate(ctx)
    start = snapshot(net)
    before = fixer.before(ctx)
    applied = fixer.apply(ctx, before)
    refreshed = _refresh_feature_norm(ctx, start)
    outcome = fixer.verify(ctx, before, applied)
    if refreshed:
        outcome.changes |= refreshed
        outcome.notes.append(f"the layers below the feature-normalised head {head_layer.name} changed, so its "
                             "feature statistics (ENTAME eq. 20) were measured again on the data")
    stray = sorted(changed_keys(start, snapshot(net)) - outcome.changes)
    outcome.checks.append(Check("untouched_tensors_identical", after=float(len(stray)),
                                target="0 changed outside the method's layers", passed=not stray))
    if stray:
        outcome.notes.append(f"changed outside the method's layers: {', '.join(stray[:5])}")

    result = FixResult(
        method=method, outcome=outcome, input_path=model_path, input_sha256=loaded.sha256, format=loaded.format,
        arch=loaded.arch, head=head_layer.name, num_classes=bundle.num_classes,
        data=bundle.info(),
        settings={"seed": seed, "new_head": new_head, "head": head, "max_samples": data.max_samples,
                  "subset": data.subset,
                  "batch_size": data.batch_size, "image_size": data.image_size, "normalize": data.normalize,
                  "split": data.split, "device": model_opts.device},
        out=out if write else None, notes=notes, input_scan=loaded.scan)
    if not outcome.passed:
        failed = "; ".join(f"{c.name} = {_fmt(c.after)} (wanted {c.target})" for c in outcome.failures())
        raise FixFailed(f"{method} did not pass its verification: {failed}; nothing was written",
                        _remedy(method), result)
    if not write:
        return result
    try:
        saved = ckpt.save_model(loaded, net, out, force=force, notes=result.notes, class_names=bundle.class_names)
        result.output_sha256, result.output_scan = saved.sha256, saved.scan
        result.sidecar = ckpt.write_sidecar(out, result.record())
    except FtdoctorError:
        raise
    except Exception as exc:  # noqa: BLE001 - disk full, permissions, ...: the journal undoes every write
        raise FtdoctorError(f"writing {out} failed ({type(exc).__name__}: {str(exc)[:200]}); nothing was written",
                            "check the disk space and permissions of the output directory, then run again") from None
    return result


#: how ``fix --new-head`` draws the fresh head before the method runs: as ``probe --new-head`` does (ENTAME's
#: He-initialised baseline), so a fix's "before" figures are that probe's
NEW_HEAD_INIT = "kaiming"


def _refresh_feature_norm(ctx: FixContext, start: Mapping[str, torch.Tensor]) -> set[str]:
    """A feature-normalised head (``FeatureNormLinear``) keeps the statistics of the features that reached it;
    when a fix changed a layer below it, they are measured again, so the written model normalises what its
    backbone now computes. Returns the buffer keys set (none when nothing below the head changed)."""
    from ftdoctor.fixes.passes import input_statistics

    head = ctx.head
    module = ctx.model.get_submodule(head.name) if head.name else ctx.model
    if not isinstance(module, FeatureNormLinear):
        return set()
    prefix = head.name + "."
    if not any(not k.startswith(prefix) for k in changed_keys(start, snapshot(ctx.model))):
        return set()
    mean, var = input_statistics(ctx.model, ctx.data, module, ctx.device, raw=True)
    module.feature_norm.set_statistics(mean, var)
    return {f"{prefix}feature_norm.mean", f"{prefix}feature_norm.var"}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _remedy(method: str) -> str:
    return {
        "entame": "the features entering the head may be very large: try --feature-norm or a smaller --phi-w",
        "rescale": "the model may not be exactly positively homogeneous between layers; rerun with --debug and "
                   "report it, or use --method datadep",
        "datadep": "the data may be too small for stable channel statistics: raise --max-samples",
        "rifle": "report it: re-initialising the head should change nothing else",
    }.get(method, "check the inputs and run again")

