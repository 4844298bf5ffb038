"""One self-contained HTML page for a probe, check, trace or compare (``--html FILE``, ``ftdoctor plot X.h5
-o X.html``).

Self-contained means: one file, no request of any kind when it is opened — the charts are matplotlib SVG
inline (their raster parts, the heat maps, as ``data:`` images), the style and the one small script are in
the page, and its Content-Security-Policy (``default-src 'none'``, the script allowed by its hash) makes the
browser refuse anything else. Every string that came from a file (layer names, labels, paths, messages) is
escaped. The page is laid out as :mod:`.pages` says; light and dark follow the reader's setting, and
printing opens every folded section.

Without matplotlib (the ``plot`` extra) the page has every table and says how to get the charts.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ftdoctor.numbers import fmt
from ftdoctor.report.content import Content, from_result
from ftdoctor.report.formats import OutputFormat, register_format

#: copy buttons on commands; every folded section opened before printing
SCRIPT = """document.addEventListener("click", function (e) {
  var b = e.target.closest ? e.target.closest("button.copy") : null;
  if (!b) return;
  var code = b.parentElement.querySelector("code");
  var done = function (t) { b.textContent = t; setTimeout(function () { b.textContent = "copy"; }, 1500); };
  var select = function () {
    var r = document.createRange(); r.selectNodeContents(code);
    var s = window.getSelection(); s.removeAllRanges(); s.addRange(r); done("selected: Ctrl+C");
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(code.textContent).then(function () { done("copied"); }, select);
  } else { select(); }
});
window.addEventListener("beforeprint", function () {
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
});"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def number(v: Any) -> str:
    """A figure as the page shows it: :func:`~ftdoctor.numbers.fmt`'s digits, the exact value on hover."""
    if isinstance(v, float):
        return f'<span class="num" title="{esc(repr(v))}">{esc(fmt(v))}</span>'
    return esc(fmt(v))


def cell(v: Any) -> str:
    """A table cell's content: numbers through :func:`number`, lists joined, anything else escaped text."""
    if isinstance(v, (int, float)) or v is None:
        return number(v)
    if isinstance(v, (list, tuple)):
        return esc(", ".join(fmt(x) if isinstance(x, float) else str(x) for x in v))
    if isinstance(v, dict):
        return esc(json.dumps(v, sort_keys=True))
    return esc(v)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table of cells already rendered (escaped) by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="tablewrap"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def pairs(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value table (settings, provenance, a probe's scalar figures)."""
    return table(("", ""), ([f"<b>{esc(k)}</b>", cell(v)] for k, v in items), "kv")


def command(cmd: str) -> str:
    """A copy-ready command: the exact text to paste, and a button that copies it. Lines wrap between the
    arguments, never inside a flag (``--data`` must not read as ``-`` and ``-data``)."""
    words = " ".join(f'<span class="w">{esc(w)}</span>' if len(w) <= 40 else esc(w) for w in cmd.split(" "))
    return f'<div class="cmd"><code>{words}</code><button class="copy" type="button">copy</button></div>'


def details(summary: str, body: str, open_: bool = False) -> str:
    return f'<details{" open" if open_ else ""}><summary>{summary}</summary>{body}</details>'


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def badge(text: str, tone: str) -> str:
    return f'<span class="badge {esc(tone)}">{esc(text)}</span>'


# -- charts -----------------------------------------------------------------------------------------
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class Charts:
    """Turns matplotlib figures into inline SVG, each with its own id space (``svg.hashsalt``) so that the
    ids of one chart never collide with another's, and no date in the file (same inputs, same page)."""

    def __init__(self) -> None:
        self.count = 0

    def svg(self, fig: Any, alt: str, tall: bool = False) -> str:
        if fig is None:
            return ""
        import matplotlib
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        self.count += 1
        FigureCanvasSVG(fig)
        buf = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"ftdoctor-chart-{self.count}",
                                    "svg.image_inline": True}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]                        # no XML prolog or DOCTYPE inside HTML
        text = text.replace("<svg ", f'<svg role="img" aria-label="{esc(alt)}" ', 1)
        return f'<figure class="chart{" tall" if tall else ""}">{text}</figure>'


# -- the page -----------------------------------------------------------------------------------------
def _style() -> str:
    return resources.files("ftdoctor.report").joinpath("page.css").read_text(encoding="utf-8")


def _finite(doc: Any) -> Any:
    """``doc`` with NaN and infinities as null (a report read from a file may hold them; JSON may not)."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {str(k): _finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_finite(v) for v in doc]
    return doc


def _json_block(doc: dict[str, Any]) -> str:
    """The report's JSON, as data (never run): ``<`` escaped so no string can close the element."""
    text = json.dumps(_finite(doc), sort_keys=True, allow_nan=False, default=str).replace("<", "\\u003c")
    return f'<script type="application/json" id="ftdoctor-report">{text}</script>'


def render(content: Content) -> str:
    """The whole page for ``content`` (a probe, check, trace or compare)."""
    from ftdoctor.report import pages
    charts = Charts() if have_matplotlib() else None
    if charts is not None:
        from ftdoctor.report.charts import plain_text
        with plain_text():
            title, body = pages.body(content, charts)
    else:
        title, body = pages.body(content, charts)
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    no_charts = "" if charts is not None else (
        '<p class="note">No charts: matplotlib is not installed. Install the plot extra '
        "(<code>pip install 'ftdoctor[plot]'</code>) and write the page again.</p>")
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="color-scheme" content="light dark"><link rel="icon" href="data:,">'
            f"<title>{esc(title)}</title><style>{_style()}</style></head>"
            f"<body><main>{no_charts}{body}</main>{_json_block(content.report)}"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_page(content: Content, path: str | Path) -> Path:
    """Write the page for ``content`` to ``path`` atomically (a journal's output when a command runs one)."""
    from ftdoctor.outputs import atomic_write
    text = render(content)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


_TRY = re.compile(r";? try `([^`]+)`")


def suggested_commands(message: str) -> tuple[str, list[str]]:
    """A check message without the commands it suggests ("…; try `ftdoctor fix …`"), and those commands."""
    return _TRY.sub("", message or ""), _TRY.findall(message or "")


@register_format
class HtmlFormat(OutputFormat):
    """One self-contained HTML page: verdict, figures against their thresholds, findings with commands, charts,
    every figure of the JSON report, settings and provenance."""

    name = "html"
    kinds = frozenset({"probe", "check", "trace", "compare"})
    file_only = True

    def write(self, result: Any, path: Path) -> None:
        write_page(from_result(result), path)
