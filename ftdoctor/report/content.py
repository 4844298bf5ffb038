"""What pictures and pages are drawn from: the report JSON plus its arrays, read from an ftdoctor HDF5 file
(as untrusted as any input) or taken from a result in memory — the same content either way, so
``probe --html`` and ``ftdoctor plot probe.h5 -o report.html`` draw the same page.

* :class:`ProbeFile` — a probe report (``ftdoctor.report/1``) and its arrays (per-channel R², G², …);
* :class:`TraceFile` — a trace or compare report and its runs (one :class:`Run` per method × seed);
* :class:`CheckFile` — a check report (``ftdoctor.check/1``), which has no arrays.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftdoctor.errors import FtdoctorError

#: a monitored run's ``data.eval_split`` when its accuracy is that of the measured training batches
MEASURED_BATCHES = "the measured training batches"

TRACE_SCHEMA = "ftdoctor.trace/1"
REPORT_SCHEMA = "ftdoctor.report/1"
CHECK_SCHEMA = "ftdoctor.check/1"

# One array of an ftdoctor HDF5 file (a G² or a heat map) may take at most this much memory.
_MAX_ARRAY_BYTES = 1 << 30
_REMEDY = "pass an .h5 file written by ftdoctor trace, compare or probe --hdf5"


@dataclass(frozen=True)
class Run:
    """One method × seed of a trace or compare: its series by name (SPEC §3) and its layers in forward order."""

    method: str
    seed: int
    series: dict[str, np.ndarray]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class TraceFile:
    report: dict[str, Any]
    runs: tuple[Run, ...]

    @property
    def methods(self) -> list[str]:
        seen: list[str] = []
        names = self.report.get("settings", {}).get("methods") or []
        for m in list(names) + [r.method for r in self.runs]:
            if m not in seen and any(r.method == m for r in self.runs):
                seen.append(m)
        return seen

    def of(self, method: str) -> list[Run]:
        return sorted((r for r in self.runs if r.method == method), key=lambda r: r.seed)

    @property
    def window(self) -> int:
        rep = self.report
        return int(rep.get("window") or rep.get("settings", {}).get("window") or 10)

    @property
    def is_compare(self) -> bool:
        return self.report.get("schema") == "ftdoctor.compare/1"

    @property
    def is_monitor(self) -> bool:
        """A run the live monitor recorded in the user's own loop (``ftdoctor.monitor``), not a ``trace``."""
        return (self.report.get("settings") or {}).get("source") == "ftdoctor.monitor"

    @property
    def accuracy_of_training_batches(self) -> bool:
        """Its accuracy is that of the measured training batches, not of an evaluation."""
        return (self.report.get("data") or {}).get("eval_split") == MEASURED_BATCHES


@dataclass(frozen=True)
class ProbeFile:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def r2_channels(self, layer: str) -> np.ndarray:
        """The finite per-channel R² of ``layer`` against the reference (empty when not measured)."""
        arr = self.arrays.get(f"probes/r2/{layer}/r2")
        arr = np.asarray(arr, float).ravel() if arr is not None else np.zeros(0)
        return arr[np.isfinite(arr)]


@dataclass(frozen=True)
class CheckFile:
    report: dict[str, Any]


Content = ProbeFile | TraceFile | CheckFile


def from_result(result: Any) -> Content:
    """The content of a probe, check, trace or compare result in memory."""
    doc = result.to_json()
    if result.kind == "probe":
        return ProbeFile(doc, dict(result.arrays()))
    if result.kind == "check":
        return CheckFile(doc)
    series = result.runs if result.kind == "compare" else (result.run,)
    runs = []
    for r in series:
        arrays = {k.rsplit("/", 1)[1]: v for k, v in r.arrays().items()}
        if r.reinitialised:
            arrays["reinitialised"] = np.asarray(r.reinitialised, dtype=np.int64)
        runs.append(Run(r.method, r.seed, arrays, tuple(r.layers)))
    return TraceFile(doc, tuple(runs))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read(path: str | Path) -> ProbeFile | TraceFile:
    """Read a trace/compare or probe HDF5 file written by ftdoctor (as untrusted as any input)."""
    try:
        return _read(path)
    except FtdoctorError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: h5py raises many types
        raise FtdoctorError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:160]}", _REMEDY) from None


def _read(path: str | Path) -> ProbeFile | TraceFile:
    import h5py

    from ftdoctor import h5safe
    path = Path(path)
    if not os.path.lexists(path):
        raise FtdoctorError(f"{path} does not exist", _REMEDY)
    f = h5safe.open_file(path, "the HDF5 file", _REMEDY)

    def array(group: Any, key: str, where: str) -> np.ndarray:
        # every dataset as untrusted as the file: no external storage or links, bounded size
        return h5safe.read_whole(h5safe.checked_dataset(group, key, f"{path}:{where}"), f"{path}:{where}",
                                 _MAX_ARRAY_BYTES)
    with f:
        schema = _text(f.attrs.get("schema", ""))
        try:
            report = json.loads(_text(f.attrs.get("report", "{}")))
        except json.JSONDecodeError:
            report = {}
        if not isinstance(report, dict):
            report = {}
        if schema == TRACE_SCHEMA:
            runs = []
            for method, group in (f["runs"].items() if "runs" in f else []):
                for name, g in group.items():
                    if not name.startswith("seed_") or not name[5:].isdigit():
                        continue
                    series = {k: array(g, k, f"{method}/{name}/{k}") for k in g.keys()}
                    if "step" in g and "reinitialised" in g["step"].attrs:
                        series["reinitialised"] = np.asarray(g["step"].attrs["reinitialised"])
                    layers = tuple(_text(x) for x in g["grad_norm"].attrs.get("layers", [])) \
                        if "grad_norm" in g else ()
                    runs.append(Run(method, int(name[5:]), series, layers))
            if not runs:
                raise FtdoctorError(f"{path} holds no runs", "write it with ftdoctor trace or compare")
            return TraceFile(report, tuple(runs))
        if schema == REPORT_SCHEMA:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            return ProbeFile(report, {name: array(f, name, name) for name in names})
    raise FtdoctorError(f"{path} is not an ftdoctor file (schema {schema or 'missing'!r})", _REMEDY)


SEVERITIES = ("error", "warning", "info")


def probe_verdict(findings: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(tone, headline, tally) of a probe's findings — what the page and the Markdown say first."""
    counts = {s: sum(1 for f in findings if isinstance(f, dict) and f.get("severity") == s) for s in SEVERITIES}
    if counts["error"]:
        tone, head = "fail", "Broken: fix the errors before anything else"
    elif counts["warning"]:
        tone, head = "warn", "Needs attention: the findings say what to run"
    else:
        tone, head = "pass", "Healthy: no figure crosses its threshold"
    tally = ", ".join(f"{n} {s}{'s' if n != 1 and s != 'info' else ''}" for s, n in counts.items() if n) or "no findings"
    return tone, head, tally


def check_names(checkpoints: list[Any]) -> list[str]:
    """Every check's name across a check report's checkpoints, in first-seen order (the columns of its matrix)."""
    names: list[str] = []
    for c in checkpoints:
        if isinstance(c, dict):
            names += [r["name"] for r in c.get("checks") or [] if isinstance(r, dict) and "name" in r
                      and r["name"] not in names]
    return names
