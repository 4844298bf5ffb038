"""Charts of a trace or compare: curves with seed bands and gradient-norm heat maps (matplotlib, no pyplot).

* :func:`curves_figure` — evaluation accuracy over all steps and zoomed on the first ``window`` steps
  (ENTAME Table 2 and its insets; the window, shaded, is Table 3's average), training loss, head-input
  variance (ENTAME Fig. 1), the batch's noise fraction against its floor 1/(C−1) (ENTAME Table 1) and the
  backbone's drift Σ‖W − W⁰‖² (L2-SP's Ω). Each method has its own colour, line style and marker, the
  mean over seeds as a line and ± one standard deviation across seeds as a band; the legend sits on top.
* :func:`heatmap_figure` — per method a layer × step map of log₁₀ ‖∇W‖ (RIFLE Fig. 2) on one shared colour
  scale, layers from the input (top) to the head (bottom); a map keeps a bounded height, and when its
  layers are too many to name each, its rows are named by block.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ftdoctor.report.charts import FLOOR, figure, label_width, layer_ticks, log_axis, shade_blocks
from ftdoctor.report.content import TraceFile

#: ENTAME Table 2's colours for its four curves, then two more.
METHOD_COLORS = {"base": "#1f77b4", "warmup": "#ff7f0e", "entame": "#2ca02c", "entame-fn": "#d62728",
                 "rifle": "#9467bd", "l2sp": "#8c564b"}
_EXTRA_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def style(method: str, i: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``i``-th method: curves that overlap stay apart."""
    return {"color": METHOD_COLORS.get(method, _EXTRA_COLORS[i % len(_EXTRA_COLORS)]),
            "ls": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)]}


def _band(ax: Any, x: np.ndarray, ys: Sequence[np.ndarray], st: dict[str, Any], label: str) -> None:
    """Mean over seeds as a line, ± one standard deviation as a band (seed band)."""
    n = min(min(len(y) for y in ys), len(x))
    if n == 0:
        return
    stack = np.vstack([np.asarray(y[:n], dtype=np.float64) for y in ys])
    with np.errstate(invalid="ignore"):
        mu = np.nanmean(stack, axis=0)
        sd = np.nanstd(stack, axis=0) if len(ys) > 1 else None
    x = np.asarray(x[:n])
    ax.plot(x, mu, color=st["color"], ls=st["ls"], marker=st["marker"], ms=4, markevery=max(1, n // 12),
            lw=1.6, label=label)
    if sd is not None:
        ax.fill_between(x, mu - sd, mu + sd, color=st["color"], alpha=0.15, lw=0)


CURVES_HEIGHT = 7.4


def curves_figure(tf: TraceFile, width: float = 15.0, into: Any = None) -> Any:
    """Six panels of curves with seed bands; the legend on top, where the eye starts."""
    methods = tf.methods
    window = tf.window
    fig = figure(width, CURVES_HEIGHT, into)
    axes = fig.subplots(2, 3).ravel()
    acc, zoom, loss, fvar, noise, drift = axes
    for i, m in enumerate(methods):
        runs = tf.of(m)
        st = style(m, i)
        label = m + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        s0 = runs[0].series
        ev_step = np.asarray(s0.get("eval_step", []))
        if ev_step.size:
            _band(acc, ev_step, [r.series["eval_acc"] * 100 for r in runs], st, label)
            sel = ev_step <= window
            _band(zoom, ev_step[sel], [np.asarray(r.series["eval_acc"])[sel[:len(r.series["eval_acc"])]] * 100
                                       for r in runs], st, label)
        step = np.asarray(s0.get("step", []))
        for ax, key in ((loss, "loss"), (fvar, "feature_var"), (noise, "noise_fraction"), (drift, "sp_penalty")):
            if key in s0:
                _band(ax, step, [r.series[key] for r in runs], st, label)
        re = s0.get("reinitialised")                 # rifle: head re-drawn after these steps
        if re is not None and np.size(re):
            for k, s in enumerate(np.atleast_1d(re)):
                acc.axvline(float(s), color=st["color"], lw=0.8, ls=":", alpha=0.8,
                            label=f"{m}: head re-initialised" if k == 0 else None)
    for ax in (acc, zoom):
        ax.axvspan(0.5, window + 0.5, color="0.92", zorder=0, label=None)
    what = "accuracy of the measured training batches" if tf.accuracy_of_training_batches else "evaluation accuracy"
    acc.set(title=f"{what} (shaded: the first {window} steps)", xlabel="step", ylabel="accuracy (%)")
    zoom.set(title=f"first {window} steps (their mean = ENTAME Table 3)", xlabel="step", ylabel="accuracy (%)")
    zoom.set_xlim(-0.2, window + 0.5)
    loss.set(title="training loss (cross-entropy)", xlabel="step", ylabel="loss")
    fvar.set(title="variance of the head's input xᴸ (ENTAME Fig. 1)", xlabel="step", ylabel="variance across batch")
    noise.set(title="noise fraction ζ/φ of the batch (ENTAME Table 1)", xlabel="step", ylabel="noise fraction")
    classes = (tf.report.get("data") or {}).get("num_classes")
    if isinstance(classes, int) and classes > 1:
        line = noise.axhline(1 / (classes - 1), color=FLOOR, ls=":", lw=1.4,
                             label=f"floor 1/(C−1) = {1 / (classes - 1):.3g}")
        noise.legend(handles=[line], loc="upper right", fontsize=8, framealpha=0.85)
    drift.set(title="backbone drift Σ‖W − W⁰‖² (L2-SP Ω)", xlabel="step", ylabel="squared distance")
    for ax, key in ((loss, "loss"), (fvar, "feature_var"), (drift, "sp_penalty")):
        vals = np.concatenate([np.ravel(r.series.get(key, [])) for r in tf.runs]).astype(float)
        vals = vals[np.isfinite(vals)]
        if vals.size and vals.min() > 0 and vals.max() / vals.min() > 30:   # log only when it spans decades
            log_axis(ax, vals, "y")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    handles, labels = acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    return fig


def grad_maps(tf: TraceFile) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[str, ...]]]:
    """Per method: log₁₀ of the seeds' mean ‖∇W‖ (layers × steps), its steps and its layers."""
    out = {}
    for m in tf.methods:
        runs = [r for r in tf.of(m) if "grad_norm" in r.series]
        if not runs:
            continue
        g = np.stack([np.asarray(r.series["grad_norm"], float) for r in runs])
        with np.errstate(divide="ignore", invalid="ignore"):
            out[m] = (np.log10(np.nanmean(g, axis=0)).T, np.asarray(runs[0].series["step"]), runs[0].layers)
    return out


def color_range(maps: dict[str, tuple[np.ndarray, Any, Any]]) -> tuple[float, float]:
    finite = [v[np.isfinite(v)] for v, _, _ in maps.values()]
    allv = np.concatenate(finite) if finite else np.zeros(0)
    return (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)


def _heat_layout(tf: TraceFile, methods: Sequence[str] | None, cols: int, max_height: float
                 ) -> tuple[list[str], int, int, float]:
    maps = grad_maps(tf)
    methods = [m for m in (methods or tf.methods) if m in maps]
    cols = max(1, min(cols, len(methods)))
    rows = math.ceil(len(methods) / cols)
    cols = max(1, math.ceil(len(methods) / rows))              # rows as full as they can be: 4 maps as 2 × 2
    nlayers = max((len(maps[m][2]) for m in methods), default=0)
    return methods, cols, rows, min(max_height, max(2.4, 0.14 * nlayers + 1.0))


def heatmap_height(tf: TraceFile, methods: Sequence[str] | None = None, cols: int = 3,
                   max_height: float = 4.2) -> float:
    _, _, rows, panel_h = _heat_layout(tf, methods, cols, max_height)
    return rows * panel_h + 0.3


def heatmap_figure(tf: TraceFile, methods: Sequence[str] | None = None, cols: int = 3,
                   width: float = 15.0, max_height: float = 4.2, into: Any = None) -> Any:
    """Per method a layer × step map of log₁₀ ‖∇W‖ on one colour scale; at most ``max_height`` inches each."""
    maps = grad_maps(tf)
    methods, cols, rows, panel_h = _heat_layout(tf, methods, cols, max_height)
    if not methods:
        return None
    vmin, vmax = color_range(maps)
    fig = figure(width, rows * panel_h + 0.3, into)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    room = int((panel_h - 1.0) / 0.13)                 # rows that fit a readable label each
    im = None
    for ax, m in zip(axes, methods):
        mat, steps, layers = maps[m]
        lo, hi = (float(steps[0]), float(steps[-1])) if steps.size else (0.0, 1.0)
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax,
                       extent=(lo - 0.5, hi + 0.5, mat.shape[0] - 0.5, -0.5))
        if layers:
            layer_ticks(ax, layers, "y", room=room)
        ax.set_title(f"{m}: log₁₀ ‖∇W‖ per layer (RIFLE Fig. 2)", fontsize=10)
        ax.set_xlabel("step")
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[:len(methods)]), label="log₁₀ gradient norm", shrink=0.9)
    return fig


def final_grad_figure(tf: TraceFile) -> Any:
    """Gradient norm of every layer at the first and the last step, one row per layer (RIFLE Fig. 2's ends),
    each method its colour: every layer named, however many."""
    maps = grad_maps(tf)
    if not maps:
        return None
    layers = max((v[2] for v in maps.values()), key=len)
    if not layers:
        return None
    fig = figure(label_width(layers) + 7.0, max(2.6, 0.17 * len(layers) + 1.4))
    axes = fig.subplots(1, 2, sharey=True, sharex=True)
    y = np.arange(len(layers))
    for ax, (where, col) in zip(axes, (("first step", 0), ("last step", -1))):
        shade_blocks(ax, layers)
        for i, m in enumerate(tf.methods):
            if m not in maps or maps[m][0].shape[0] != len(layers) or maps[m][0].shape[1] == 0:
                continue
            st = style(m, i)
            ax.plot(10 ** maps[m][0][:, col], y, ls="none", marker=st["marker"], color=st["color"], ms=4,
                    label=m, alpha=0.85)
        log_axis(ax, [float(10 ** v) for m in maps.values() for v in np.ravel(m[0]) if np.isfinite(v)])
        ax.set_title(f"‖∇W‖ at the {where} (mean over seeds)", fontsize=10)
        ax.grid(alpha=0.35, axis="x")
    layer_ticks(axes[0], layers)
    axes[0].set_ylim(len(layers) - 0.5, -0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 6), fontsize=9,
                   frameon=False)
    return fig
