"""``ftdoctor plot``: pictures of a trace, compare or probe HDF5 file (matplotlib, the ``plot`` extra).

Trace / compare files (``schema = ftdoctor.trace/1``) give one figure:

* evaluation accuracy over all steps and zoomed on the first ``window``
  steps (ENTAME Table 2 and its insets; the window is Table 3's average),
* training loss, head-input variance (ENTAME Fig. 1), the batch's noise
  fraction (ENTAME Table 1) and the backbone's drift Σ‖W − W⁰‖² (L2-SP's Ω),
  each method a colour, the mean over seeds as a line and ± one standard
  deviation across seeds as a band;
* per method a layer × step heat map of log₁₀ ‖∇W‖ (RIFLE Fig. 2), layers in
  forward order from the input (top) to the head (bottom).

Probe files (``schema = ftdoctor.report/1``): per-layer bars of the change rate
(Krähenbühl Fig. 1a) and the gradient norm (RIFLE Fig. 2), and per-layer box
plots of the per-channel R² against the reference (L2-SP Fig. 4).

Drawing uses matplotlib's object interface (no ``pyplot``), so it never
touches a user's interactive backend.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftdoctor.errors import FtdoctorError

TRACE_SCHEMA = "ftdoctor.trace/1"
REPORT_SCHEMA = "ftdoctor.report/1"
FORMATS = ("png", "pdf", "svg")
#: ENTAME Table 2's colours for its four curves, then two more.
METHOD_COLORS = {"base": "#1f77b4", "warmup": "#ff7f0e", "entame": "#2ca02c", "entame-fn": "#d62728",
                 "rifle": "#9467bd", "l2sp": "#8c564b"}
_EXTRA_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def require_matplotlib() -> None:
    """Exit-2 error naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FtdoctorError("ftdoctor plot needs matplotlib, which is not installed",
                            "install the plot extra: pip install 'ftdoctor[plot]'") from None


# -- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One method × seed from a trace/compare file."""

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


@dataclass(frozen=True)
class ProbeFile:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray]


# One array of an ftdoctor HDF5 file (a G² or a heat map) may take at most this much memory.
_MAX_ARRAY_BYTES = 1 << 30


# per-layer bar panels of a probe file: probe -> (row key, colour, y label, title, summary figure, its label)
_BARS = {"change_rate": ("change_rate", "#1f77b4", "change rate", "change rate per layer (Krähenbühl Fig. 1a)",
                         "spread", "spread max/min"),
         "grad_norm": ("grad_norm", "#ff7f0e", "‖∇W‖ (mean over batches)", "gradient norm per layer (RIFLE Fig. 2)",
                       "depth_ratio", "depth ratio first/head")}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read(path: str | Path) -> TraceFile | ProbeFile:
    """Read a trace/compare or probe HDF5 file written by ftdoctor (as untrusted as any input)."""
    try:
        return _read(path)
    except FtdoctorError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: h5py raises many types
        raise FtdoctorError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:160]}",
                            "pass an .h5 file written by ftdoctor trace, compare or probe --hdf5") from None


def _read(path: str | Path) -> TraceFile | ProbeFile:
    import h5py

    from ftdoctor import h5safe
    path = Path(path)
    if not os.path.lexists(path):
        raise FtdoctorError(f"{path} does not exist", "pass an .h5 file written by ftdoctor trace, compare or probe")
    f = h5safe.open_file(path, "the HDF5 file", "pass an .h5 file written by ftdoctor trace, compare or probe --hdf5")

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
        if schema == TRACE_SCHEMA:
            runs = []
            for method, group in (f["runs"].items() if "runs" in f else []):
                for name, g in group.items():
                    if not name.startswith("seed_"):
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
            arrays: dict[str, np.ndarray] = {}

            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            for name in names:
                arrays[name] = array(f, name, name)
            return ProbeFile(report, arrays)
    raise FtdoctorError(f"{path} is not an ftdoctor file (schema {schema or 'missing'!r})",
                        "pass an .h5 file written by ftdoctor trace, compare or probe --hdf5")


# -- drawing helpers ----------------------------------------------------------------------------
def _color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _band(ax: Any, x: np.ndarray, ys: Sequence[np.ndarray], color: str, label: str) -> None:
    """Mean over seeds as a line, ± one standard deviation as a band (seed band)."""
    n = min(len(y) for y in ys)
    stack = np.vstack([np.asarray(y[:n], dtype=np.float64) for y in ys])
    with np.errstate(invalid="ignore"):
        mu = np.nanmean(stack, axis=0)
        sd = np.nanstd(stack, axis=0) if len(ys) > 1 else None
    x = np.asarray(x[:n])
    ax.plot(x, mu, color=color, lw=1.6, label=label)
    if sd is not None:
        ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.2, lw=0)


def _layer_ticks(ax: Any, names: Sequence[str], axis: str = "y", max_labels: int = 40) -> None:
    n = len(names)
    every = max(1, math.ceil(n / max_labels))
    idx = list(range(0, n, every))
    if idx and idx[-1] != n - 1:
        idx.append(n - 1)
    size = 8 if n <= 20 else 6
    if axis == "y":
        ax.set_yticks(idx)
        ax.set_yticklabels([names[i] for i in idx], fontsize=size)
    else:
        ax.set_xticks(idx)
        ax.set_xticklabels([names[i] for i in idx], fontsize=size, rotation=60, ha="right",
                           rotation_mode="anchor")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


# -- trace / compare ----------------------------------------------------------------------------
def dynamics_figure(tf: TraceFile) -> Any:
    """Curves with seed bands and per-method gradient-norm heat maps."""
    rep = tf.report
    methods = tf.methods
    window = int(rep.get("window") or rep.get("settings", {}).get("window") or 10)
    seeds = len({r.seed for r in tf.runs})
    n_heat = len(methods)
    heat_cols = min(3, n_heat)
    heat_rows = math.ceil(n_heat / heat_cols)
    layers = max((r.layers for r in tf.runs), key=len)
    heat_h = max(2.6, 0.16 * len(layers) + 1.2)
    fig = _figure(15, 6.4 + heat_rows * heat_h)
    gs = fig.add_gridspec(2 + heat_rows, 6, height_ratios=[3.2, 3.2] + [heat_h] * heat_rows)
    axes = [fig.add_subplot(gs[r, 2 * c:2 * c + 2]) for r in range(2) for c in range(3)]
    acc, zoom, loss, fvar, noise, drift = axes

    for i, m in enumerate(methods):
        runs = tf.of(m)
        color = _color(m, i)
        label = m + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        ev_step = runs[0].series["eval_step"]
        _band(acc, ev_step, [r.series["eval_acc"] * 100 for r in runs], color, label)
        sel = ev_step <= window
        _band(zoom, ev_step[sel], [r.series["eval_acc"][sel] * 100 for r in runs], color, label)
        step = runs[0].series["step"]
        _band(loss, step, [r.series["loss"] for r in runs], color, label)
        _band(fvar, step, [r.series["feature_var"] for r in runs], color, label)
        _band(noise, step, [r.series["noise_fraction"] for r in runs], color, label)
        if "sp_penalty" in runs[0].series:
            _band(drift, step, [r.series["sp_penalty"] for r in runs], color, label)
        re = runs[0].series.get("reinitialised")          # rifle: head re-drawn after these steps
        if re is not None and np.size(re):
            for k, s in enumerate(np.atleast_1d(re)):
                acc.axvline(float(s), color=color, lw=0.8, ls=":", alpha=0.8,
                            label=f"{m}: head re-initialised" if k == 0 else None)

    acc.set(title="evaluation accuracy", xlabel="step", ylabel="accuracy (%)")
    zoom.set(title=f"first {window} steps (mean = ENTAME Table 3)", xlabel="step", ylabel="accuracy (%)")
    zoom.axvspan(0.5, window + 0.5, color="0.92", zorder=0)
    zoom.set_xlim(0, window + 0.5)
    loss.set(title="training loss (cross-entropy)", xlabel="step", ylabel="loss")
    fvar.set(title="variance of the head's input xᴸ (ENTAME Fig. 1)", xlabel="step", ylabel="variance across batch")
    noise.set(title="noise fraction ζ/φ of the batch (ENTAME Table 1)", xlabel="step", ylabel="noise fraction")
    drift.set(title="backbone drift Σ‖W − W⁰‖² (L2-SP Ω)", xlabel="step", ylabel="squared distance")
    for ax, key in ((loss, "loss"), (fvar, "feature_var"), (drift, "sp_penalty")):
        vals = np.concatenate([np.ravel(r.series.get(key, [])) for r in tf.runs])
        vals = vals[np.isfinite(vals)]
        if vals.size and vals.min() > 0 and vals.max() / vals.min() > 30:   # log only when it spans decades
            ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)

    # heat maps: one shared colour scale
    mats = {}
    for m in methods:
        runs = tf.of(m)
        g = np.stack([r.series["grad_norm"] for r in runs])
        with np.errstate(divide="ignore", invalid="ignore"):
            mats[m] = np.log10(np.nanmean(g, axis=0)).T          # layers × steps
    finite = np.concatenate([v[np.isfinite(v)] for v in mats.values()]) if mats else np.array([0.0])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = None
    heat_axes = []
    for i, m in enumerate(methods):
        r, c = divmod(i, heat_cols)
        span = 6 // heat_cols
        ax = fig.add_subplot(gs[2 + r, c * span:(c + 1) * span])
        heat_axes.append(ax)
        mat = mats[m]
        steps = tf.of(m)[0].series["step"]
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax,
                       extent=(float(steps[0]) - 0.5, float(steps[-1]) + 0.5, mat.shape[0] - 0.5, -0.5))
        _layer_ticks(ax, tf.of(m)[0].layers, "y")
        ax.set(title=f"{m}: log₁₀ ‖∇W‖ per layer (RIFLE Fig. 2)", xlabel="step")
    if im is not None:
        fig.colorbar(im, ax=heat_axes, label="log₁₀ gradient norm", shrink=0.9)

    data = rep.get("data", {})
    model = rep.get("model", {})
    what = "compare" if rep.get("schema") == "ftdoctor.compare/1" else "trace"
    bands = "; bands = ± 1 sd across seeds" if seeds > 1 else ""
    fig.suptitle(f"ftdoctor {what}: {Path(str(model.get('path', '?'))).name} on {data.get('name', '?')} "
                 f"({data.get('num_classes', '?')} classes), {seeds} seed{'s' if seeds > 1 else ''}{bands}",
                 fontsize=12)
    return fig


# -- probe --------------------------------------------------------------------------------------
def probe_figure(pf: ProbeFile) -> Any:
    """Per-layer bars (change rate, gradient norm) and R² box plots per layer (L2-SP Fig. 4)."""
    probes = pf.report.get("probes", {})
    panels = []
    cr = probes.get("change_rate")
    if cr and cr.get("layers"):
        panels.append("change_rate")
    gn = probes.get("grad_norm")
    if gn and gn.get("layers"):
        panels.append("grad_norm")
    r2 = probes.get("r2")
    if r2 and r2.get("layers"):
        panels.append("r2")
    if not panels:
        raise FtdoctorError("the probe file has no per-layer figures to draw",
                            "probe with --probes change_rate,grad_norm (and r2 with --reference)")
    nlayers = max(len(probes[p]["layers"]) for p in panels)
    width = max(9.0, min(28.0, 0.32 * nlayers + 4))
    fig = _figure(width, 3.8 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, panels):
        rows = probes[name]["layers"]
        names = [r["name"] for r in rows]
        x = np.arange(len(rows))
        if name in _BARS:
            key, color, ylabel, title, summary, label = _BARS[name]
            vals = np.array([r[key] if r[key] is not None else np.nan for r in rows], float)
            ax.bar(x, vals, color=color)
            ax.set_yscale("log")
            figure = probes[name].get(summary)
            ax.set(ylabel=ylabel, title=title + (f" — {label} = {figure:.3g}" if figure else ""))
        else:
            data = []
            for r in rows:
                arr = pf.arrays.get(f"probes/r2/{r['name']}/r2")
                arr = np.asarray(arr, float) if arr is not None else np.array([np.nan])
                arr = arr[np.isfinite(arr)]
                data.append(arr if arr.size else np.array([np.nan]))
            ax.boxplot(data, positions=x, widths=0.6, showfliers=True,
                       flierprops={"markersize": 2, "alpha": 0.5},
                       medianprops={"color": "#d62728"})
            ax.set_ylim(-0.02, 1.02)
            ax.set(ylabel="R² per channel", title="R² of activations vs the reference, per layer (L2-SP Fig. 4)")
        _layer_ticks(ax, names, "x")
        ax.set_xlim(-0.7, len(rows) - 0.3)
        ax.grid(alpha=0.3, axis="y")
    model = pf.report.get("model", {})
    data = pf.report.get("data", {})
    fig.suptitle(f"ftdoctor probe: {Path(str(model.get('path', '?'))).name} on {data.get('name', '?')} "
                 f"({data.get('num_samples', '?')} examples); layers in forward order", fontsize=12)
    return fig


# -- entry point --------------------------------------------------------------------------------
def plot(path: str | Path, out: str | Path) -> Path:
    """Draw ``path`` (a trace, compare or probe HDF5 file) to ``out`` (.png, .pdf or .svg), atomically."""
    from ftdoctor.outputs import Output, journal
    path, out = Path(path), Path(out)
    with journal([Output(out, "-o")], (path,)):      # never over its input; all or nothing
        require_matplotlib()
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise FtdoctorError(f"cannot tell the picture format from {out.name!r}",
                                f"end the output name with one of {', '.join('.' + f for f in FORMATS)}")
        return _draw(path, out, fmt)


def _draw(path: Path, out: Path, fmt: str) -> Path:
    from ftdoctor.outputs import atomic_write
    content = read(path)
    fig = dynamics_figure(content) if isinstance(content, TraceFile) else probe_figure(content)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    return out
