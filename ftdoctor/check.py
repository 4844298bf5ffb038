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

import glob
import math
import os
import sys
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

import ftdoctor
from ftdoctor.errors import DataError, FtdoctorError
from ftdoctor.thresholds import Thresholds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCHEMA = "ftdoctor.check/1"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
OFF = "off"

# Threshold keys by direction: a value passes when value <= max_* or value >= min_*.
_FLOAT_KEYS = ("max_noise_fraction", "max_excess_noise_fraction", "max_change_rate_spread",
               "max_change_rate_cv", "min_depth_ratio", "min_r2_median", "max_drift_rel")
# Which probe measures each data check.
PROBE_OF = {"max_noise_fraction": "noise", "max_excess_noise_fraction": "noise",
            "max_change_rate_spread": "change_rate", "max_change_rate_cv": "change_rate",
            "min_depth_ratio": "grad_norm", "min_r2_median": "r2"}
_DATA_CHECKS = tuple(PROBE_OF)


# -- configuration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedThresholds:
    """Thresholds and where they came from (``source`` is a file path, or None for the defaults)."""

    thresholds: Thresholds
    source: str | None


def valid_keys() -> list[str]:
    return Thresholds.keys()


def find_pyproject(start: str | Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)
    that has a ``[tool.ftdoctor]`` table — as ruff does, so a sub-project's own
    pyproject.toml without ftdoctor settings does not hide the repository's."""
    here = Path(start or os.getcwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            doc = _read_toml(candidate)
            tool = doc.get("tool")
            if isinstance(tool, dict) and "ftdoctor" in tool:
                return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    from ftdoctor.safety import MAX_CONFIG_BYTES, read_bounded
    try:
        return tomllib.loads(read_bounded(path, MAX_CONFIG_BYTES, "the config file").decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FtdoctorError(f"{path} is not valid TOML: {exc}", "fix the file's syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FtdoctorError(f"cannot read the config file {path}: {exc}",
                            "check the path and its permissions") from None


def config_table(path: str | Path, *, explicit: bool) -> dict[str, Any]:
    """The ``[tool.ftdoctor.check]`` table of a TOML file.

    A file passed with ``--config`` (``explicit``) may instead hold the keys at
    its top level (a dedicated ``ftdoctor.toml``); it must hold one or the other.
    """
    path = Path(path)
    if explicit and not os.path.exists(path):
        raise FtdoctorError(f"config file {path} not found", "pass an existing TOML file to --config")
    doc = _read_toml(path)
    tool = doc.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("ftdoctor"), dict):
        table = tool["ftdoctor"].get("check", {})
        if not isinstance(table, dict):
            raise FtdoctorError(f"{path}: tool.ftdoctor.check must be a table",
                                "write it as a [tool.ftdoctor.check] section")
        return table
    if explicit and "tool" not in doc:
        return doc
    if explicit:
        raise FtdoctorError(f"{path} has no [tool.ftdoctor.check] table",
                            f"add one with some of: {', '.join(valid_keys())}")
    return {}


def validate_settings(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check keys and types; map ``false``/``"off"`` to None (check disabled)."""
    unknown = [k for k in table if k not in valid_keys()]
    if unknown:
        raise FtdoctorError(f"unknown ftdoctor check key(s) {', '.join(map(repr, unknown))} in {source}",
                            f"valid keys: {', '.join(valid_keys())}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        out[key] = _validate_value(key, value, source)
    return out


def _validate_value(key: str, value: Any, source: str) -> Any:
    if key == "require_finite":
        if isinstance(value, bool):
            return value
        raise FtdoctorError(f"{key} in {source} must be true or false, got {value!r}",
                            f"write {key} = true (the default) or false")
    if value is False or (isinstance(value, str) and value.strip().lower() == OFF):
        return None
    if key == "expect_num_classes":
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise FtdoctorError(f"{key} in {source} must be a whole number of classes >= 1, got {value!r}",
                            f"write e.g. {key} = 10 (or false to disable the check)")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise FtdoctorError(f"{key} in {source} must be a finite number >= 0, got {value!r}",
                        f"write e.g. {key} = {getattr(Thresholds(), key)} (or false / off to disable the check)")


def resolve_thresholds(config: str | Path | None = None, *, cwd: str | Path | None = None,
                       overrides: Mapping[str, Any] | None = None) -> ResolvedThresholds:
    """Documented defaults < ``[tool.ftdoctor.check]`` (``config``, or the nearest pyproject.toml
    above ``cwd``) < ``overrides`` (the command-line flags; ``"off"`` disables a check)."""
    if config is not None:
        source: Path | None = Path(config)
        table = config_table(source, explicit=True)
    else:
        source = find_pyproject(cwd)
        table = config_table(source, explicit=False) if source is not None else {}
    values = validate_settings(table, str(source))
    values.update(validate_settings(dict(overrides or {}), "the command line"))
    return ResolvedThresholds(replace(Thresholds(), **values), str(source) if source is not None else None)


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """One check of one checkpoint. ``passed`` is None when the check could not run."""

    name: str
    passed: bool | None
    value: float | int | bool | str | None
    threshold: float | int | bool | None
    message: str

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else ("passed" if self.passed else "failed")

    def to_json(self) -> dict[str, Any]:
        value = self.value
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        return {"name": self.name, "passed": self.passed, "value": value, "threshold": self.threshold,
                "message": self.message}


@dataclass(frozen=True)
class CheckpointVerdict:
    """The verdict on one checkpoint: it passes when no check failed."""

    path: str
    checks: tuple[CheckResult, ...]
    sha256: str | None = None
    arch: str | None = None

    @property
    def passed(self) -> bool:
        return not any(c.passed is False for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "sha256": self.sha256, "arch": self.arch,
                "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True)
class CheckReport:
    """Every verdict of one ``check`` run. Exit code 0 when all passed, 1 otherwise (SPEC §4)."""

    checkpoints: tuple[CheckpointVerdict, ...]
    thresholds: Thresholds
    config: str | None = None
    data: str | None = None
    reference: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checkpoints)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def failures(self) -> list[tuple[CheckpointVerdict, CheckResult]]:
        return [(cp, c) for cp in self.checkpoints for c in cp.failures]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ftdoctor_version": ftdoctor.__version__, "passed": self.passed,
                "config": self.config, "data": self.data, "reference": self.reference,
                "thresholds": {f.name: getattr(self.thresholds, f.name) for f in fields(self.thresholds)},
                "checkpoints": [c.to_json() for c in self.checkpoints]}


# -- which files ------------------------------------------------------------------------------------
def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _files_in(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))   # .git, .venv, temporary files
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(CHECKPOINT_SUFFIXES):
                found.append(Path(root) / name)
    return found


def collect_checkpoints(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, directories (searched recursively for .pt/.pth/.bin/.ckpt/.safetensors, hidden
    entries skipped) and globs (``**`` recurses), in the order given, duplicates once."""
    if not patterns:
        raise FtdoctorError("no checkpoint given", "pass one or more files, directories or globs")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for pattern in patterns:
        text = str(pattern)
        p = Path(text)
        if p.is_dir():
            files = _files_in(p)
            if not files:
                raise FtdoctorError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in directory {text}",
                                    "point ftdoctor check at the files, or at a directory that holds them")
            for f in files:
                add(f)
        elif p.exists():
            add(p)
        elif _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = [m for f in matches for m in ([Path(f)] if Path(f).is_file() else _files_in(Path(f)))]
            if not files:
                raise FtdoctorError(f"the pattern {text!r} matches no checkpoint file",
                                    "check the glob (quote it so the shell passes it on; ** recurses)")
            for f in files:
                add(f)
        else:
            raise FtdoctorError(f"no such checkpoint: {text}", "check the path")
    return out


# -- the checks -------------------------------------------------------------------------------------
def planned_checks(thresholds: Thresholds, *, with_data: bool, with_reference: bool) -> list[str]:
    """The checks every checkpoint gets, in report order."""
    names = ["loadable"]
    if thresholds.require_finite:
        names.append("require_finite")
    names.append("head_found")
    if thresholds.expect_num_classes is not None:
        names.append("expect_num_classes")
    if with_reference and thresholds.max_drift_rel is not None:
        names.append("max_drift_rel")
    if with_data:
        names.append("runs_on_data")
        for key in _DATA_CHECKS:
            if getattr(thresholds, key) is None or (key == "min_r2_median" and not with_reference):
                continue
            names.append(key)
    return names


def probes_needed(thresholds: Thresholds, *, with_reference: bool) -> tuple[str, ...]:
    """Only the probes the enabled data checks read (drift is computed without data)."""
    names = []
    for key in _DATA_CHECKS:
        if getattr(thresholds, key) is None or (key == "min_r2_median" and not with_reference):
            continue
        if PROBE_OF[key] not in names:
            names.append(PROBE_OF[key])
    return tuple(names)


def _fmt(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4g}"


def _bound(key: str, value: float | None, threshold: float, what: str, *, where: str = "",
           hint: str = "") -> CheckResult:
    """Compare against a max_*/min_* threshold; a value that could not be measured fails."""
    if value is None or not math.isfinite(value):
        return CheckResult(key, False, None, threshold, f"{what} could not be measured{where}")
    upper = key.startswith("max_")
    ok = value <= threshold if upper else value >= threshold
    op = ("<=" if ok else ">") if upper else (">=" if ok else "<")
    msg = f"{what} {_fmt(value)}{where} {op} {threshold:g}"
    if not ok and hint:
        msg += f": {hint}"
    return CheckResult(key, ok, float(value), threshold, msg)


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


def noise_checks(fig: Mapping[str, Any], t: Thresholds, wanted: Sequence[str]) -> list[CheckResult]:
    out = []
    hint = "the head's first updates send mostly noise into the backbone (ENTAME Table 1); try " \
           "`ftdoctor fix MODEL --method entame --data DATA -o FIXED.pt`"
    for key, figure, what in (("max_noise_fraction", "noise_fraction", "noise fraction"),
                              ("max_excess_noise_fraction", "excess_noise_fraction", "excess noise fraction")):
        if key not in wanted:
            continue
        value = fig.get(figure)
        phi = fig.get("total_energy")
        if value is None and isinstance(phi, (int, float)) and phi == 0:
            # φ = 0: every prediction is exactly right, so there is no error and no noise in it.
            out.append(CheckResult(key, True, None, getattr(t, key),
                                   f"{what} undefined: {fig.get('reason') or 'total error energy is 0'}"))
        elif value is None and not (isinstance(phi, (int, float)) and math.isfinite(phi)):
            out.append(CheckResult(key, False, None, getattr(t, key),
                                   f"{what} could not be measured: the model's outputs on the data are NaN or Inf"))
        else:
            floor = fig.get("max_entropy_noise_fraction")
            where = f" (floor 1/(C-1) = {floor:.4g})" if key == "max_noise_fraction" and floor is not None else ""
            out.append(_bound(key, value, getattr(t, key), what, where=where, hint=hint))
    return out


def change_rate_checks(fig: Mapping[str, Any], t: Thresholds, wanted: Sequence[str]) -> list[CheckResult]:
    out = []
    layers = [l for l in fig.get("layers", []) if l.get("change_rate") is not None]
    if "max_change_rate_spread" in wanted:
        where = ""
        if layers:
            fast = max(layers, key=lambda l: l["change_rate"])
            slow = min(layers, key=lambda l: l["change_rate"])
            where = f" (fastest {fast['name']}, slowest {slow['name']})"
        out.append(_bound("max_change_rate_spread", fig.get("spread"), t.max_change_rate_spread,
                          "change-rate spread", where=where,
                          hint="layers learn at very different speeds (Krähenbühl et al. Fig. 1a); try "
                               "`ftdoctor fix MODEL --method rescale --data DATA -o FIXED.pt`"))
    if "max_change_rate_cv" in wanted:
        cvs = [l for l in fig.get("layers", []) if l.get("cv") is not None]
        worst = max(cvs, key=lambda l: l["cv"]) if cvs else None
        out.append(_bound("max_change_rate_cv", worst["cv"] if worst else None, t.max_change_rate_cv,
                          "largest within-layer change-rate cv",
                          where=f" ({worst['name']})" if worst else " (no layer measured)",
                          hint="per-weight rates vary a lot inside the layer (Krähenbühl et al. Fig. 1b); try "
                               f"`ftdoctor fix MODEL --method datadep --layers {worst['name'] if worst else 'L'}`"))
    return out


def grad_norm_checks(fig: Mapping[str, Any], t: Thresholds) -> list[CheckResult]:
    layers = fig.get("layers", [])
    where = f" ({layers[0]['name']} / head)" if layers else ""
    return [_bound("min_depth_ratio", fig.get("depth_ratio"), t.min_depth_ratio,
                   "gradient depth ratio", where=where,
                   hint="the lower layers will barely move when fine-tuning (RIFLE Fig. 2); try "
                        "`ftdoctor fix MODEL --method rifle --data DATA -o FIXED.pt`")]


def r2_checks(fig: Mapping[str, Any], t: Thresholds) -> list[CheckResult]:
    rows = [r for r in fig.get("layers", []) if r.get("median") is not None]
    worst = min(rows, key=lambda r: r["median"]) if rows else None
    return [_bound("min_r2_median", worst["median"] if worst else None, t.min_r2_median,
                   "lowest per-layer median R² against the reference",
                   where=f" ({worst['name']})" if worst else " (no layer matched the reference)",
                   hint="the pretrained features were largely overwritten (L2-SP Fig. 4); fine-tune "
                        "with an L2-SP penalty (`ftdoctor trace MODEL --method l2sp`)")]


def drift_check(layers: Sequence[Any], reference: nn.Module, threshold: float) -> CheckResult:
    from ftdoctor.probes.drift import drift_figures
    fig = drift_figures(layers, dict(reference.named_modules()))
    rows = [r for r in fig["layers"] if r["rel"] is not None]
    if not rows:
        return CheckResult("max_drift_rel", False, None, threshold,
                           "no affine layer matches the reference by name and shape: is --reference the "
                           "pretrained model of this architecture?")
    worst = max(rows, key=lambda r: r["rel"])
    return _bound("max_drift_rel", worst["rel"], threshold, "largest relative weight drift",
                  where=f" ({worst['name']})",
                  hint="regularise towards the pretrained weights (`ftdoctor trace MODEL --method l2sp`)")


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class _Shared:
    """What one run loads once and reuses across checkpoints: data per input-channel count,
    reference models per architecture."""

    data: Any
    reference: str | Path | None
    model_opts: Any
    bundles: dict[int | None, Any] = field(default_factory=dict)
    references: dict[str | None, nn.Module] = field(default_factory=dict)

    def bundle(self, model: nn.Module) -> Any:
        from ftdoctor.session import first_in_channels, open_data
        channels = first_in_channels(model)
        if channels not in self.bundles:
            self.bundles[channels] = open_data(model, self.data)
        return self.bundles[channels]

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


def _probe_thresholds(t: Thresholds) -> Thresholds:
    """The probes' findings need numbers: disabled keys fall back to the defaults (findings are not the verdict)."""
    d = Thresholds()
    return replace(t, **{k: getattr(d, k) for k in _FLOAT_KEYS if getattr(t, k) is None})


def _error_text(exc: FtdoctorError) -> str:
    return f"{exc.cause} (hint: {exc.remedy})"


def judge(path: Path, *, model_opts: Any, thresholds: Thresholds, shared: _Shared, plan: Sequence[str],
          head: str | None = None, new_head: bool = False, head_init: str = "kaiming", seed: int = 0,
          image_size: int | None = None) -> CheckpointVerdict:
    """Run the planned checks on one checkpoint; only configuration problems raise."""
    from ftdoctor import checkpoint as ckpt
    from ftdoctor.model import find_head
    from ftdoctor.session import find_layers, install_new_head, with_head

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

    try:
        loaded = ckpt.load_model(path, model_opts)
    except FtdoctorError as exc:
        results["loadable"] = CheckResult("loadable", False, False, None, _error_text(exc))
        return done()
    net = loaded.model
    results["loadable"] = CheckResult("loadable", True, True, None,
                                      f"{loaded.format} checkpoint, architecture {loaded.arch or 'unknown'}")
    info = {"sha256": loaded.sha256, "arch": loaded.arch}
    finite = True
    if "require_finite" in plan:
        results["require_finite"] = finite_check(net)
        finite = bool(results["require_finite"].passed)

    device = torch.device(model_opts.device)
    layers = None
    order_error: str | None = None
    bundle = None
    if "runs_on_data" in plan:
        bundle = shared.bundle(net)
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
            results["max_drift_rel"] = drift_check(layers, shared.reference_model(loaded), t.max_drift_rel)

    if "runs_on_data" not in plan:
        return done(**info)
    data_checks = [n for n in plan if n in _DATA_CHECKS]
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
    figures: dict[str, Mapping[str, Any]] = {}
    samples = 0
    if names:
        opts = ProbeOptions(probes=names, head=head_layer.name, new_head=new_head, head_init=head_init,
                            seed=seed, thresholds=_probe_thresholds(t))
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
    ran = f"{samples} examples" if names else "a batch"
    results["runs_on_data"] = CheckResult(
        "runs_on_data", True, samples, None,
        f"ran on {ran} of {bundle.name} ({bundle.split}), {classes} classes"
        + (f", fresh {head_init} head" if new_head else ""))
    if "noise" in figures:
        results.update({r.name: r for r in noise_checks(figures["noise"], t, data_checks)})
    if "change_rate" in figures:
        results.update({r.name: r for r in change_rate_checks(figures["change_rate"], t, data_checks)})
    if "grad_norm" in figures:
        results.update({r.name: r for r in grad_norm_checks(figures["grad_norm"], t)})
    if "r2" in figures:
        results.update({r.name: r for r in r2_checks(figures["r2"], t)})
    return done(**info)


def _validate_model_options(opts: Any) -> None:
    """A wrong ``--arch`` or ``--device`` is a bad invocation (exit 2), not a failed ``loadable`` of every file."""
    from ftdoctor import checkpoint as ckpt
    if opts.arch:
        ckpt.check_arch(opts.arch)
    ckpt.parse_device(opts.device)


def check(paths: Sequence[str | Path], *, model: Any = None, data: Any = None,
          reference: str | Path | None = None, thresholds: Thresholds = Thresholds(),
          head: str | None = None, new_head: bool = False, head_init: str = "kaiming", seed: int = 0,
          image_size: int | None = None, config: str | None = None) -> CheckReport:
    """``ftdoctor check``: judge checkpoints (files, directories, globs) against ``thresholds``.

    ``model`` is a :class:`ftdoctor.checkpoint.ModelOptions`; ``data`` a
    :class:`ftdoctor.data.DataOptions` or None (then only the data-free checks
    run); ``reference`` the pretrained checkpoint for drift (L2-SP Ω) and R².
    With ``new_head`` the head is replaced, before the data checks, by a fresh
    ``head_init`` head for the data's classes (ENTAME Table 1's setting: how
    will this backbone fine-tune on the data?). ``image_size`` sizes the dummy
    input that finds the layer order without data (default: the data's
    ``image_size``, else a few common sizes). ``config`` only labels the report.
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
    _validate_model_options(model_opts)
    files = collect_checkpoints(paths)
    plan = planned_checks(thresholds, with_data=data is not None, with_reference=reference is not None)
    shared = _Shared(data=data, reference=reference, model_opts=model_opts)
    verdicts = tuple(judge(p, model_opts=model_opts, thresholds=thresholds, shared=shared, plan=plan, head=head,
                           new_head=new_head, head_init=head_init, seed=seed,
                           image_size=image_size or getattr(data, "image_size", None))
                     for p in files)
    return CheckReport(verdicts, thresholds, config=config,
                       data=getattr(data, "data", None) if data is not None else None,
                       reference=str(reference) if reference is not None else None)


class _CallableModule(types.ModuleType):
    """``ftdoctor.check`` is both this module and the library call (SPEC §6): once the module is
    imported, Python makes the package attribute ``ftdoctor.check`` the module, so the module
    itself forwards calls to :func:`check`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CheckReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
