"""Charts of a probe and of a check, drawn with matplotlib's object interface (no ``pyplot``, so a user's
interactive backend is never touched); :mod:`.plot` puts them in one picture, :mod:`.html` in a page.

Per-layer charts put the layers on the vertical axis, one row each in forward order from the input (top) to
the head (bottom), every name written out, the blocks (``layer3.1``, ``blocks.7``,
``encoder.layer.4``) shaded in turn: a 300-layer net is a tall chart that scrolls, never a squeezed one.
Every figure is drawn against the line it is judged by — ENTAME's floor 1/(C−1) and the thresholds of
:mod:`ftdoctor.thresholds` (the gate's, or the probe run's own).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import numpy as np

from ftdoctor.report.content import CheckFile, ProbeFile
from ftdoctor.thresholds import Thresholds

#: one row of a per-layer chart, and the width of one of its panels, in inches
ROW, PANEL = 0.17, 2.4
PASS, FAIL, FLOOR, LIMIT = "#2ca02c", "#d62728", "#555555", "#d62728"
_SHADE = "#e8edf3"


@contextlib.contextmanager
def plain_text() -> Iterator[None]:
    """Draw every string as it is: a layer name or a file name with ``$`` in it is not mathtext (which
    could fail on it, or print something else)."""
    import matplotlib
    with matplotlib.rc_context({"text.parse_math": False}):
        yield


def figure(width: float, height: float, into: Any = None) -> Any:
    """A new constrained-layout figure of this size, or ``into`` (a sub-figure of a composed picture)."""
    if into is not None:
        return into
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def label_width(names: Sequence[str]) -> float:
    """Inches that the longest of ``names`` needs as a tick label."""
    return min(4.0, 0.8 + 0.065 * max((len(n) for n in names), default=4))


def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to the first index (``layer3.1.conv2`` → ``layer3.1``)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


def blocks(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers in one block: (block, first index, last index)."""
    out: list[tuple[str, int, int]] = []
    for i, n in enumerate(names):
        b = block_of(n)
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1], i)
        else:
            out.append((b, i, i))
    return out


def shade_blocks(ax: Any, names: Sequence[str], axis: str = "y") -> None:
    """Every other block on a light band, so the eye finds a block's layers together."""
    span = ax.axhspan if axis == "y" else ax.axvspan
    for k, (_, lo, hi) in enumerate(blocks(names)):
        if k % 2:
            span(lo - 0.5, hi + 0.5, color=_SHADE, zorder=0, lw=0)


def layer_ticks(ax: Any, names: Sequence[str], axis: str = "y", room: int | None = None) -> None:
    """Every layer's name when there is room (``room`` labels), otherwise each block's name at its first
    layer (and every k-th block when even those do not fit)."""
    n = len(names)
    if room is None or n <= room:
        idx, labels = list(range(n)), list(names)
    else:                                   # blocks' names, none closer than n / room rows to the last
        gap, idx, labels = n / max(room, 1), [], []
        for b, lo, _ in blocks(names):
            if not idx or lo - idx[-1] >= gap:
                idx.append(lo)
                labels.append(b)
    size = 8 if n <= 30 else 7
    if axis == "y":
        ax.set_yticks(idx, labels, fontsize=size)
    else:
        ax.set_xticks(idx, labels, fontsize=size, rotation=60, ha="right", rotation_mode="anchor")


def thresholds_of(report: dict[str, Any]) -> Thresholds:
    """The thresholds a report was judged by (its ``settings.thresholds``, else the defaults)."""
    from ftdoctor.check.config import validate_settings
    from ftdoctor.errors import FtdoctorError
    given = (report.get("settings") or {}).get("thresholds") or report.get("thresholds") or {}
    kw: dict[str, Any] = {}
    for key in ("max_noise_fraction", "max_excess_noise_fraction", "max_change_rate_spread", "max_change_rate_cv",
                "min_depth_ratio", "min_r2_median", "max_drift_rel"):
        try:        # as pyproject's [tool.ftdoctor.check] is read; a damaged or disabled one keeps its default line
            value = validate_settings({key: given[key]}, "the report")[key] if isinstance(given, dict) \
                and key in given else None
        except FtdoctorError:
            value = None
        if value is not None:
            kw[key] = value
    return Thresholds(**kw)


def _values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r.get(key) if isinstance(r.get(key), (int, float)) else np.nan for r in rows], float)


def log_axis(ax: Any, values: Sequence[float], axis: str = "x") -> None:
    """A log scale whose ticks read as plain numbers (1, 2, 5, 10, … within a few decades; powers of ten
    beyond), never matplotlib's overlapping minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    decades = math.log10(max(vals) / min(vals)) if vals else 0.0
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    scale = ax.xaxis if axis == "x" else ax.yaxis
    scale.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)))
    scale.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    scale.set_minor_formatter(NullFormatter())


def _hbars(ax: Any, vals: np.ndarray, color: str, log: bool) -> None:
    y = np.arange(len(vals))
    ok = np.isfinite(vals) & ((vals > 0) if log else True)
    ax.barh(y[ok], vals[ok], color=color, height=0.72, zorder=2)
    if log:
        log_axis(ax, vals[ok])


def _box(ax: Any, data: list[np.ndarray]) -> None:
    import matplotlib
    positions = [i for i, d in enumerate(data) if d.size]
    if not positions:
        return
    flat = {"orientation": "horizontal"} if tuple(map(int, matplotlib.__version__.split(".")[:2])) >= (3, 10) \
        else {"vert": False}
    ax.boxplot([data[i] for i in positions], positions=positions, widths=0.6, showfliers=True,
               flierprops={"markersize": 2, "alpha": 0.5}, medianprops={"color": FAIL}, manage_ticks=False,
               **flat)


def _line(ax: Any, x: float | None, label: str, color: str = LIMIT, style: str = "--") -> None:
    if x is not None and math.isfinite(x):
        ax.axvline(x, color=color, ls=style, lw=1.2, label=label, zorder=3)


def layer_panels(pf: ProbeFile) -> list[str]:
    """The per-layer panels a probe report can fill."""
    probes = pf.report.get("probes", {})
    out = []
    for name, key in (("change_rate", "change_rate"), ("change_rate", "cv"), ("grad_norm", "grad_norm"),
                      ("r2", "r2"), ("drift", "rel")):
        rows = (probes.get(name) or {}).get("layers") or []
        if rows and (key == "r2" or np.isfinite(_values(rows, key)).any()):
            out.append(key)
    return out


def layer_names(pf: ProbeFile) -> list[str]:
    """Every measured layer in forward order (the order of the first probe that lists it)."""
    names: list[str] = []
    for figures in pf.report.get("probes", {}).values():
        for r in (figures or {}).get("layers") or []:
            if isinstance(r, dict) and r.get("name") not in names:
                names.append(str(r.get("name")))
    return names


def layers_size(pf: ProbeFile) -> tuple[float, float]:
    return label_width(layer_names(pf)) + PANEL * len(layer_panels(pf)), max(2.6, ROW * len(layer_names(pf)) + 1.4)


def layers_figure(pf: ProbeFile, into: Any = None) -> Any:
    """One row per layer, one panel per figure side by side: change rate and its within-layer cv
    (Krähenbühl Fig. 1a/1b), gradient norm (RIFLE Fig. 2), R² box plots (L2-SP Fig. 4), relative drift."""
    probes = pf.report.get("probes", {})
    t = thresholds_of(pf.report)
    panels = layer_panels(pf)
    names = layer_names(pf)
    if not panels or not names:
        return None
    fig = figure(*layers_size(pf), into)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    index = {n: i for i, n in enumerate(names)}

    def rows_of(probe: str) -> list[dict[str, Any]]:
        rows = [{}] * len(names)
        for r in probes[probe].get("layers") or []:
            if r.get("name") in index:
                rows[index[r["name"]]] = r
        return rows

    for ax, key in zip(axes, panels):
        shade_blocks(ax, names)
        if key == "change_rate":
            cr = probes["change_rate"]
            vals = _values(rows_of("change_rate"), key)
            _hbars(ax, vals, "#1f77b4", log=True)
            spread = cr.get("backbone_spread") or cr.get("spread")
            ax.set_title(f"change rate (Krähenbühl Fig. 1a)\nspread {_g(spread)}, limit "
                         f"{t.max_change_rate_spread:g}", fontsize=9)
            top = np.nanmax(vals) if np.isfinite(vals).any() else None
            if top:
                _line(ax, top / t.max_change_rate_spread, f"fastest / {t.max_change_rate_spread:g}")
        elif key == "cv":
            _hbars(ax, _values(rows_of("change_rate"), key), "#6baed6", log=False)
            ax.set_title(f"within-layer cv of rates (Fig. 1b)\nlimit {t.max_change_rate_cv:g}", fontsize=9)
            _line(ax, t.max_change_rate_cv, f"limit {t.max_change_rate_cv:g}")
        elif key == "grad_norm":
            gn = probes["grad_norm"]
            rows = rows_of("grad_norm")
            _hbars(ax, _values(rows, key), "#ff7f0e", log=True)
            ax.set_title(f"gradient norm ‖∇W‖ (RIFLE Fig. 2)\ndepth ratio {_g(gn.get('depth_ratio'))}, limit "
                         f"{t.min_depth_ratio:g}", fontsize=9)
            head = next((r.get("grad_norm") for r in rows if r.get("name") == gn.get("head")), None)
            if isinstance(head, (int, float)) and head > 0:
                _line(ax, head * t.min_depth_ratio, f"head × {t.min_depth_ratio:g}")
        elif key == "r2":
            _box(ax, [pf.r2_channels(n) for n in names])
            meds = _values(rows_of("r2"), "median")
            ax.plot(meds, np.arange(len(names)), "D", color=FAIL, ms=3, zorder=4, label="median")
            ax.set_xlim(-0.02, 1.02)
            ax.set_title(f"R² per channel vs reference (L2-SP Fig. 4)\nlimit on the median {t.min_r2_median:g}",
                         fontsize=9)
            _line(ax, t.min_r2_median, f"limit {t.min_r2_median:g}")
        else:
            _hbars(ax, _values(rows_of("drift"), key), "#8c564b", log=False)
            ax.set_title(f"relative drift ‖W−W⁰‖/‖W⁰‖ (L2-SP)\nlimit {t.max_drift_rel:g}", fontsize=9)
            _line(ax, t.max_drift_rel, f"limit {t.max_drift_rel:g}")
        ax.grid(alpha=0.35, axis="x", zorder=1)
        ax.tick_params(axis="x", labelsize=8, top=len(names) > 40, labeltop=len(names) > 40)  # a tall chart: both
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if key != "r2" else "lower left", fontsize=7, framealpha=0.85)
    layer_ticks(axes[0], names)
    axes[0].set_ylim(len(names) - 0.5, -0.5)
    return fig


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


NOISE_HEIGHT = 1.9


def has_noise(pf: ProbeFile) -> bool:
    return isinstance((pf.report.get("probes", {}).get("noise") or {}).get("noise_fraction"), (int, float))


def noise_figure(pf: ProbeFile, width: float = 9.0, into: Any = None) -> Any:
    """ENTAME's noise fraction ζ/φ as its two parts (uniform (1/C)/φ, excess (ζ−1/C)/φ) against the floor
    1/(C−1) it reaches at a maximum-entropy head (eqs. 13–17) and the limits it is judged by."""
    noise = pf.report.get("probes", {}).get("noise") or {}
    total, uniform = noise.get("noise_fraction"), noise.get("uniform_noise_fraction")
    if not has_noise(pf):
        return None
    t = thresholds_of(pf.report)
    floor = noise.get("max_entropy_noise_fraction")
    fig = figure(width, NOISE_HEIGHT, into)
    ax = fig.add_subplot()
    excess = noise.get("excess_noise_fraction")
    if isinstance(uniform, (int, float)) and isinstance(excess, (int, float)):
        ax.barh([0], [uniform], color="#9ecae1", height=0.5, label=f"uniform part (1/C)/φ {uniform:.3g}")
        ax.barh([0], [excess], left=[uniform], color="#fd8d3c" if excess > t.max_excess_noise_fraction
                else "#74c476", height=0.5, label=f"excess (ζ−1/C)/φ {excess:.3g}")
    else:
        ax.barh([0], [total], color="#9ecae1", height=0.5, label=f"ζ/φ {total:.3g}")
    ends = [total]
    if isinstance(floor, (int, float)):
        ax.axvline(floor, color=FLOOR, ls=":", lw=1.5, label=f"floor 1/(C−1) {floor:.3g}")
        bound = t.max_noise_fraction.of(floor) if hasattr(t.max_noise_fraction, "of") else t.max_noise_fraction
        ends.append(floor)
    else:
        bound = t.max_noise_fraction if isinstance(t.max_noise_fraction, float) else None
    if isinstance(bound, float):
        ax.axvline(bound, color=LIMIT, ls="--", lw=1.5, label=f"limit {t.max_noise_fraction} = {bound:.3g}")
        ends.append(bound)
    if isinstance(uniform, (int, float)):
        lim = uniform + t.max_excess_noise_fraction
        ax.axvline(lim, color="#a63603", ls="-.", lw=1.4, label=f"excess limit {t.max_excess_noise_fraction:g}")
        ends.append(lim)
    ax.set_xlim(0, max(ends) * 1.12)
    ax.set_yticks([])
    ax.set_title(f"noise fraction ζ/φ at the head (ENTAME Table 1): {total:.3g}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.35, axis="x")
    return fig


#: the gated figures of a check, drawn one panel each: check name -> (title, log scale)
GATED = {"max_noise_fraction": ("noise fraction ζ/φ", False),
         "max_excess_noise_fraction": ("excess noise fraction", False),
         "max_change_rate_spread": ("change-rate spread", True),
         "max_change_rate_cv": ("largest within-layer cv", True),
         "min_depth_ratio": ("gradient depth ratio", True),
         "min_r2_median": ("R² median, deepest layer", False),
         "max_drift_rel": ("largest relative drift", False)}


def check_figure(cf: CheckFile) -> Any:
    """One panel per gated figure: each checkpoint's value (green passed, red failed) against its threshold."""
    cps = [c for c in cf.report.get("checkpoints") or [] if isinstance(c, dict)]
    names = [str(c.get("path")) for c in cps]
    panels = [k for k in GATED if any(_check(c, k) is not None for c in cps)]
    if not panels or not names:
        return None
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = figure(label_width(names) + 2.7 * cols, rows * (0.26 * len(names) + 1.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        key = panels[k]
        title, log = GATED[key]
        xs: list[float] = []
        for i, c in enumerate(cps):
            res = _check(c, key)
            if res is None or not isinstance(res.get("value"), (int, float)):
                continue
            v = float(res["value"])
            xs.append(v)
            ok = res.get("passed")
            ax.plot([v], [i], "o" if ok else "X", ms=7, color=PASS if ok else FAIL, zorder=3)
            thr = res.get("threshold")
            if isinstance(thr, (int, float)) and not isinstance(thr, bool):
                ax.plot([thr, thr], [i - 0.4, i + 0.4], color=LIMIT, lw=1.6, zorder=2)
                xs.append(float(thr))
        if log and xs and min(xs) > 0 and max(xs) / min(xs) > 30:     # log only when it spans decades
            log_axis(ax, xs)
        ax.set_title(f"{title}\n({key})", fontsize=9)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_yticks(range(len(names)), names if k % cols == 0 else [""] * len(names), fontsize=8)
        ax.grid(alpha=0.35, axis="x")
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(x=0.15)
    fig.suptitle("each checkpoint's figure (● passed, ✕ failed) and its threshold (red bar)", fontsize=10)
    return fig


def _check(cp: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in cp.get("checks") or [] if isinstance(c, dict) and c.get("name") == name), None)
