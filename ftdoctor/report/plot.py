"""``ftdoctor plot``: a picture (.png, .pdf, .svg) or a page (.html) of a trace, compare or probe HDF5 file.

The picture puts the charts of :mod:`.charts` and :mod:`.dyncharts` one above the other:

* trace / compare (``ftdoctor.trace/1``): curves with seed bands (accuracy, the first ``window`` steps,
  loss, head-input variance, noise fraction against its floor, backbone drift), then the per-method
  gradient-norm heat maps, each of bounded height;
* probe (``ftdoctor.report/1``): the noise fraction against its floor and limits, then one row per layer
  with the change rate, its within-layer cv, the gradient norm, the R² box plot and the relative drift,
  each against its threshold.

``.html`` writes the self-contained page of :mod:`.html` instead, the same page ``--html`` writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ftdoctor.errors import FtdoctorError
from ftdoctor.report.content import ProbeFile, TraceFile, read
from ftdoctor.report.dyncharts import METHOD_COLORS

FORMATS = ("png", "pdf", "svg", "html")

__all__ = ["FORMATS", "METHOD_COLORS", "ProbeFile", "TraceFile", "dynamics_figure", "plot", "probe_figure",
           "read", "require_matplotlib"]


def require_matplotlib() -> None:
    """Exit-2 error naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FtdoctorError("ftdoctor plot needs matplotlib, which is not installed",
                            "install the plot extra: pip install 'ftdoctor[plot]'") from None


def _stack(parts: list[tuple[float, float, Any]]) -> Any:
    """One figure holding ``parts`` (width, height, draw(sub-figure)) one above the other."""
    from ftdoctor.report.charts import figure
    width = max(w for w, _, _ in parts)
    heights = [h for _, h, _ in parts]
    fig = figure(width, sum(heights))
    subs = fig.subfigures(len(parts), 1, height_ratios=heights) if len(parts) > 1 else [fig]
    for sub, (_, _, draw) in zip(subs, parts):
        draw(sub)
    return fig


def dynamics_figure(tf: TraceFile) -> Any:
    """Curves with seed bands above the per-method gradient-norm heat maps."""
    from ftdoctor.report import dyncharts
    width = 15.0
    parts = [(width, dyncharts.CURVES_HEIGHT, lambda sub: dyncharts.curves_figure(tf, width, into=sub))]
    if dyncharts.grad_maps(tf):
        parts.append((width, dyncharts.heatmap_height(tf), lambda sub: dyncharts.heatmap_figure(tf, width=width,
                                                                                                into=sub)))
    fig = _stack(parts)
    seeds = len({r.seed for r in tf.runs})
    rep = tf.report
    data, model = rep.get("data") or {}, rep.get("model") or {}
    bands = "; bands = ± 1 sd across seeds" if seeds > 1 else ""
    fig.suptitle(f"ftdoctor {'compare' if tf.is_compare else 'trace'}: {Path(str(model.get('path', '?'))).name} "
                 f"on {data.get('name', '?')} ({data.get('num_classes', '?')} classes), {seeds} "
                 f"seed{'s' if seeds > 1 else ''}{bands}", fontsize=12)
    return fig


def probe_figure(pf: ProbeFile) -> Any:
    """The noise fraction against its floor and limits above one row per layer of every per-layer figure."""
    from ftdoctor.report import charts
    if not charts.layer_panels(pf) or not charts.layer_names(pf):
        raise FtdoctorError("the probe file has no per-layer figures to draw",
                            "probe with --probes change_rate,grad_norm (and r2 with --reference)")
    width, height = charts.layers_size(pf)
    width = max(width, 9.0)
    parts = []
    if charts.has_noise(pf):
        parts.append((width, charts.NOISE_HEIGHT, lambda sub: charts.noise_figure(pf, width, into=sub)))
    parts.append((width, height, lambda sub: charts.layers_figure(pf, into=sub)))
    fig = _stack(parts)
    model, data = pf.report.get("model") or {}, pf.report.get("data") or {}
    fig.suptitle(f"ftdoctor probe: {Path(str(model.get('path', '?'))).name} on {data.get('name', '?')} "
                 f"({data.get('num_samples', '?')} examples); layers in forward order", fontsize=12)
    return fig


def plot(path: str | Path, out: str | Path) -> Path:
    """Draw ``path`` (a trace, compare or probe HDF5 file) to ``out`` (.png, .pdf, .svg, or .html for the
    self-contained page), atomically."""
    from ftdoctor.outputs import Output, journal
    path, out = Path(path), Path(out)
    with journal([Output(out, "-o")], (path,)):      # never over its input; all or nothing
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise FtdoctorError(f"cannot tell the picture format from {out.name!r}",
                                f"end the output name with one of {', '.join('.' + f for f in FORMATS)}")
        if fmt != "html":                             # a page without matplotlib still has every table
            require_matplotlib()
        return _draw(path, out, fmt)


def _draw(path: Path, out: Path, fmt: str) -> Path:
    content = read(path)
    try:
        if fmt == "html":
            from ftdoctor.report.html import write_page
            return write_page(content, out)
        from ftdoctor.report.charts import plain_text
        with plain_text():
            return _render(content, out, fmt)
    except FtdoctorError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # the file's report is as untrusted as the file: a figure of the wrong type cannot be drawn
        raise FtdoctorError(f"cannot draw {path}: its report is damaged ({type(exc).__name__}: {str(exc)[:120]})",
                            "write it again with ftdoctor probe --hdf5, trace or compare") from None


def _render(content: ProbeFile | TraceFile, out: Path, fmt: str) -> Path:
    from ftdoctor.outputs import atomic_write
    fig = dynamics_figure(content) if isinstance(content, TraceFile) else probe_figure(content)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, metadata=_metadata(fmt)))
    return out


def _metadata(fmt: str) -> dict[str, Any] | None:
    """No creation date in the file: the same inputs draw the same bytes."""
    return {"Date": None} if fmt == "svg" else ({"CreationDate": None} if fmt == "pdf" else None)
