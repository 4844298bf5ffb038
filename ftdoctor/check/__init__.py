"""``ftdoctor check``: a CI gate on exported checkpoints (SPEC §4).

:func:`check` judges each checkpoint with a fixed list of named checks and
returns a :class:`CheckReport` (``to_json()`` is the ``ftdoctor.check/1``
document). Thresholds are a :class:`~ftdoctor.thresholds.Thresholds`;
:func:`resolve_thresholds` builds one the way black and ruff find their
settings: ``[tool.ftdoctor.check]`` of the nearest ``pyproject.toml`` above the
working directory (or ``--config FILE``), then command-line overrides.

The checks, in the order they are reported:

==============================  ==========  ===============================================
check                           needs       passes when
==============================  ==========  ===============================================
``pickle_safe``                 —           no pickle in it names a global that can act
``loadable``                    —           the file loads into a model
``require_finite``              —           no NaN/Inf in any parameter or buffer
``head_found``                  —           the model has an affine head (SPEC §1)
``expect_num_classes``          the key     the head has that many outputs
``max_drift_rel``               reference   every layer's ‖W − W⁰‖/‖W⁰‖ ≤ it (L2-SP Ω)
``runs_on_data``                data        the model runs on the data, head matches its classes
``max_noise_fraction``          data        ENTAME Table 1 noise fraction ζ/φ ≤ it
``max_excess_noise_fraction``   data        (ζ − 1/C)/φ ≤ it
``max_change_rate_spread``      data        Krähenbühl Fig. 1a max/min change rate ≤ it
``max_change_rate_cv``          data        every layer's per-weight cv (Fig. 1b) ≤ it
``min_depth_ratio``             data        RIFLE Fig. 2 first layer / head grad norm ≥ it
``min_r2_median``               data + ref  every matched layer's median R² (L2-SP Fig. 4) ≥ it
==============================  ==========  ===============================================

A threshold set to ``None`` (``false`` in TOML, ``off`` on the command line)
disables its check. Every checkpoint lists the same checks: a check that could
not run because an earlier one failed (no probes on a model with NaN weights,
nothing after an unloadable file) is reported with ``passed = None`` and a
message saying why, so a CI system sees it as skipped, not passed.

What is a failed check (exit 1) and what is unusable input (exit 2): the gate
judges checkpoints, so anything wrong *with a checkpoint* — a corrupt,
truncated or unsafe file, NaN weights, no affine head, the wrong class count,
a model that cannot run on the data — is a failed check of that checkpoint.
Bad configuration, bad flags, no checkpoint matched, an empty directory, an
unusable dataset or reference raise :class:`~ftdoctor.errors.FtdoctorError`
(exit 2) before anything is reported.
"""
from __future__ import annotations

import dataclasses

import sys
import types
from pathlib import Path
from typing import Any, Sequence

from ftdoctor.check.collect import CHECKPOINT_SUFFIXES, collect_checkpoints
from ftdoctor.check.config import (OFF, ResolvedThresholds, config_table, find_pyproject, resolve_thresholds,
                                   valid_keys, validate_settings)
from ftdoctor.check.judge import (_Shared, data_check_keys, finite_check, judge, nonfinite_tensors, planned_checks,
                                  probes_needed)
from ftdoctor.check.results import SCHEMA, CheckpointVerdict, CheckReport, CheckResult
from ftdoctor.errors import FtdoctorError
from ftdoctor.thresholds import Thresholds

__all__ = ["CHECKPOINT_SUFFIXES", "OFF", "SCHEMA", "CheckReport", "CheckResult", "CheckpointVerdict",
           "ResolvedThresholds", "check", "collect_checkpoints", "config_table", "data_check_keys", "find_pyproject",
           "finite_check", "judge", "nonfinite_tensors", "planned_checks", "probes_needed", "resolve_thresholds",
           "valid_keys", "validate_settings"]


def _validate_model_options(opts: Any) -> None:
    """A wrong ``--arch`` or ``--device`` is a bad invocation (exit 2), not a failed ``loadable`` of every file."""
    from ftdoctor import checkpoint as ckpt
    if opts.arch:
        ckpt.check_arch(opts.arch)
    ckpt.parse_device(opts.device)


def check(paths: Sequence[str | Path], *, model: Any = None, data: Any = None,
          reference: str | Path | None = None, thresholds: Thresholds | None = None,
          head: str | None = None, new_head: bool = False, head_init: str = "kaiming", seed: int = 0,
          image_size: int | None = None, config: str | None = None,
          overrides: dict[str, Any] | None = None, output: str | Path | None = None,
          output_format: str = "text", html: str | Path | None = None) -> CheckReport:
    """``ftdoctor check``: judge checkpoints (files, directories, globs) against ``thresholds``.

    ``model`` is a :class:`ftdoctor.checkpoint.ModelOptions`; ``data`` a
    :class:`ftdoctor.data.DataOptions` or None (then only the data-free checks
    run); ``reference`` the pretrained checkpoint for drift (L2-SP Ω) and R².
    With ``new_head`` the head is replaced, before the data checks, by a fresh
    ``head_init`` head for the data's classes (ENTAME Table 1's setting: how
    will this backbone fine-tune on the data?). ``image_size`` sizes the dummy
    input that finds the layer order without data (default: the data's
    ``image_size``, else a few common sizes). Without ``thresholds`` they are resolved from ``config`` (a
    TOML file; default: the nearest pyproject.toml with ``[tool.ftdoctor]``) and ``overrides`` (the
    command-line flags); with them, ``config`` only labels the report. With ``output`` the report is
    written there in ``output_format`` (``text``, ``json``, ``junit``, ``github``), and with ``html`` the
    self-contained page, both checked against every input first.
    Raises :class:`FtdoctorError` (exit 2) for unusable configuration or input;
    problems of a checkpoint are failed checks in the report.
    """
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.heads import HEAD_INITS
    model_opts = model or ckpt.ModelOptions()
    if head_init not in HEAD_INITS:
        raise FtdoctorError(f"unknown --head-init {head_init!r}", f"use one of {', '.join(HEAD_INITS)}")
    if new_head and data is None:
        raise FtdoctorError("--new-head only changes the data checks, and no --data was given",
                            "add --data DATA, or drop --new-head")
    if reference is not None and not Path(reference).is_file():
        raise FtdoctorError(f"reference checkpoint {reference} not found", "pass an existing file to --reference")
    resolved = None
    if thresholds is None:
        resolved = resolve_thresholds(config, overrides=overrides)
        thresholds, config = resolved.thresholds, resolved.source
    _validate_model_options(model_opts)
    files = collect_checkpoints(paths)
    from ftdoctor.data import input_paths
    from ftdoctor.outputs import Output, journal
    inputs = (*files, reference, config, *(input_paths(data.data, data.data_root) if data is not None else ()))
    outputs = [Output(Path(p), flag) for p, flag in ((output, "--output"), (html, "--html")) if p is not None]
    with journal(outputs, inputs):
        plan = planned_checks(thresholds, with_data=data is not None, with_reference=reference is not None)
        shared = _Shared(data=data, reference=reference, model_opts=model_opts, new_head=new_head, config=config)
        verdicts = tuple(judge(p, model_opts=_model_for(p, model_opts, resolved), thresholds=thresholds,
                               shared=shared, plan=plan,
                               head=head, new_head=new_head, head_init=head_init, seed=seed,
                               image_size=image_size or getattr(data, "image_size", None))
                         for p in files)
        report = CheckReport(verdicts, thresholds, config=config,
                             data=getattr(data, "data", None) if data is not None else None,
                             reference=str(reference) if reference is not None else None)
        from ftdoctor.report import write_files
        write_files(report, ((output_format, output), ("html", html)))
    return report


def _model_for(path: Path, model_opts: Any, resolved: Any) -> Any:
    """``--arch`` wins; without it, the architecture ``[tool.ftdoctor.check.arch]`` maps this path to."""
    if model_opts.arch is not None or resolved is None:
        return model_opts
    arch = resolved.arch_for(Path(path))
    return model_opts if arch is None else dataclasses.replace(model_opts, arch=arch)


class _CallableModule(types.ModuleType):
    """``ftdoctor.check`` is both this module and the library call (SPEC §6): once the module is
    imported, Python makes the package attribute ``ftdoctor.check`` the module, so the module
    itself forwards calls to :func:`check`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CheckReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
