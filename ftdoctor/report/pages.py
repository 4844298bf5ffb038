"""What the HTML page of each kind of result says, in reading order: the verdict and what to do first, each
figure against its threshold, the charts, then every figure of the JSON report, the settings and where the
inputs came from (sha256, versions). The building blocks (escaping, tables, charts as SVG) are :mod:`.html`.

The probe page judges its figures with each probe's own ``judge()`` — the rule its findings and ``check``
use — against the thresholds the run recorded, so the page and the terminal never disagree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ftdoctor.report import charts as ch
from ftdoctor.report.content import (SEVERITIES, CheckFile, Content, ProbeFile, TraceFile, check_names,
                                     probe_verdict)
from ftdoctor.report.html import (Charts, badge, cell, command, details, esc, number, pairs, section,
                                  suggested_commands, table)

#: a per-layer chart taller than this many inches scrolls inside its frame
_TALL = 11.0


def body(content: Content, charts: Charts | None) -> tuple[str, str]:
    """(title, body HTML) of the page for ``content``."""
    if isinstance(content, ProbeFile):
        title, page = probe_page(content, charts)
    elif isinstance(content, CheckFile):
        title, page = check_page(content, charts)
    else:
        title, page = dynamics_page(content, charts)
    if 'id="charts"' not in page:              # no chart drawn (no matplotlib): no link to them
        page = page.replace('<a href="#charts">Charts</a>', "")
    return title, page


def _toc(entries: list[tuple[str, str]]) -> str:
    return '<nav class="toc">' + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in entries) + "</nav>"


def _footer(doc: dict[str, Any]) -> str:
    return (f"<footer>Written by ftdoctor {esc(doc.get('ftdoctor_version', '?'))}. This page is one file: no "
            "request leaves it. The report's JSON is embedded in it (element <code>#ftdoctor-report</code>)."
            "</footer>")


def _name(path: Any) -> str:
    return Path(str(path or "?")).name


def _provenance(doc: dict[str, Any]) -> str:
    model, data = doc.get("model") or {}, dict(doc.get("data") or {})
    subset = data.pop("subset", None)
    items = [(f"model {k}", v) for k, v in model.items()] + [(f"data {k}", v) for k, v in data.items()]
    if isinstance(subset, dict):
        items += [(f"data subset {k}", v) for k, v in subset.items()]
    items += [("ftdoctor version", doc.get("ftdoctor_version")), ("torch version", doc.get("torch_version"))]
    settings = dict(doc.get("settings") or {})
    thresholds = settings.pop("thresholds", None)
    out = "<h3>Where it came from</h3>" + pairs(items) + "<h3>Settings</h3>" + pairs(settings.items())
    if isinstance(thresholds, dict):
        out += "<h3>Thresholds the figures were judged by</h3>" + pairs(thresholds.items())
    return out


def _svg(charts: Charts | None, fig: Any, alt: str) -> str:
    if charts is None or fig is None:
        return ""
    height = fig.get_figheight()
    return charts.svg(fig, alt, tall=height > _TALL)


# -- probe ------------------------------------------------------------------------------------------
def _verdicts(doc: dict[str, Any]) -> list[Any]:
    """Each probe's figures judged by its own rule against the run's thresholds."""
    from ftdoctor.probes import PROBES
    t = ch.thresholds_of(doc)
    out = []
    for name, figures in (doc.get("probes") or {}).items():
        if name in PROBES and isinstance(figures, dict):
            try:
                out += PROBES[name].judge(figures, t)
            except (KeyError, TypeError, ValueError, AttributeError):   # a damaged report: no verdicts
                continue
    return out


def _finding(f: dict[str, Any]) -> str:
    sev = str(f.get("severity", "info"))
    cmd = command(f["suggestion"]) if f.get("suggestion") else ""
    return (f'<div class="finding {esc(sev)}">{badge(sev, sev)} <b>{esc(f.get("probe", ""))}</b>'
            f'<p class="msg">{esc(f.get("message", ""))}</p>{cmd}</div>')


def _probe_verdict(findings: list[dict[str, Any]]) -> str:
    tone, head, tally = probe_verdict(findings)
    return f'<div class="verdict {tone}"><span class="headline">{esc(head)}</span><span>{esc(tally)}</span></div>'


def _layer_tables(doc: dict[str, Any]) -> str:
    """Every per-layer figure of every probe, one table per probe, a rule above each block's first layer."""
    out = []
    for name, figures in (doc.get("probes") or {}).items():
        rows = [r for r in (figures or {}).get("layers") or [] if isinstance(r, dict)] \
            if isinstance(figures, dict) else []
        if not rows:
            continue
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k != "name" and k not in keys]
        body, last = [], None
        for r in rows:
            block = ch.block_of(str(r.get("name", "")))
            cls = ' class="blockstart"' if last is not None and block != last else ""
            last = block
            body.append(f"<tr{cls}><td>{esc(r.get('name', ''))}</td>"
                        + "".join(f"<td>{cell(r.get(k))}</td>" for k in keys) + "</tr>")
        head = "".join(f"<th>{esc(h)}</th>" for h in ["layer", *keys])
        out.append(f"<h3>{esc(name)}</h3><div class=\"tablewrap\"><table><thead><tr>{head}</tr></thead>"
                   f"<tbody>{''.join(body)}</tbody></table></div>")
    return "".join(out)


def _scalar_figures(doc: dict[str, Any]) -> str:
    out = []
    for name, figures in (doc.get("probes") or {}).items():
        if isinstance(figures, dict):
            items = [(k, v) for k, v in figures.items() if k != "layers"]
            if items:
                out.append(f"<h3>{esc(name)}</h3>" + pairs(items))
    return "".join(out)


def probe_page(pf: ProbeFile, charts: Charts | None) -> tuple[str, str]:
    doc = pf.report
    m, d = doc.get("model") or {}, doc.get("data") or {}
    findings = [f for f in doc.get("findings") or [] if isinstance(f, dict)]
    findings.sort(key=lambda f: SEVERITIES.index(f.get("severity")) if f.get("severity") in SEVERITIES else 3)
    title = f"ftdoctor probe: {_name(m.get('path'))} on {d.get('name', '?')}"
    head = (f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(m.get('arch') or 'model')} ({esc(m.get('format', '?'))}, "
            f"{cell(m.get('num_params'))} parameters, head <code>{esc(m.get('head', '?'))}</code>, "
            f"{cell(m.get('num_classes'))} classes) on {esc(d.get('name', '?'))} ({esc(d.get('split', '?'))}, "
            f"{cell(d.get('num_samples'))} examples). Path: <code>{esc(m.get('path', '?'))}</code></p>")
    toc = _toc([("findings", "Findings"), ("figures", "Figures and thresholds"), ("charts", "Charts"),
                ("layers", "Every figure"), ("settings", "Settings and provenance")])
    rows = []
    for v in _verdicts(doc):
        rows.append([esc(v.key), number(v.value), number(v.threshold), _outcome_badge(v.passed),
                     f'<span class="text">{esc(v.message)}</span>'])
    summary = "".join(f"<tr><td>{esc(k)}</td><td class=\"text\">{esc(t)}</td></tr>" for k, t in _summary(doc))
    figures = (table(("threshold", "figure", "limit", "verdict", "what it says"), rows) if rows else "") + (
        f'<div class="tablewrap"><table class="kv"><tbody>{summary}</tbody></table></div>' if summary else "")
    found = "".join(_finding(f) for f in findings) or "<p>No findings: nothing to fix.</p>"
    skipped = [s for s in doc.get("skipped") or [] if isinstance(s, dict)]
    if skipped:
        found += details(f"Not measured ({len(skipped)})", table(("layer", "probe", "why"), (
            [esc(s.get("name", "")), esc(s.get("probe", "")), f'<span class="text">{esc(s.get("reason", ""))}</span>']
            for s in skipped)))
    notes = "".join(f"<li>{esc(n)}</li>" for n in doc.get("notes") or [])
    if notes:
        found += f'<ul class="note">{notes}</ul>'
    graphs = ""
    if charts is not None:
        graphs = (_svg(charts, ch.noise_figure(pf), "noise fraction against its floor and limits")
                  + _svg(charts, ch.layers_figure(pf), "per-layer figures against their thresholds"))
    layer_count = len(ch.layer_names(pf))
    every = (details(f"Per-layer figures ({layer_count} layers)", _layer_tables(doc), open_=layer_count <= 40)
             + details("Each probe's figures", _scalar_figures(doc), open_=True))
    body = (head + toc + _probe_verdict(findings) + section("Findings", found, "findings")
            + section("Figures and thresholds", figures, "figures")
            + (section("Charts", graphs, "charts") if graphs else "")
            + section("Every figure", every, "layers")
            + section("Settings and provenance", _provenance(doc), "settings") + _footer(doc))
    return title, body


def _summary(doc: dict[str, Any]) -> list[tuple[str, str]]:
    from ftdoctor.report.table import summary_items
    try:
        return summary_items(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        return []


# -- check ------------------------------------------------------------------------------------------
def check_page(cf: CheckFile, charts: Charts | None) -> tuple[str, str]:
    doc = cf.report
    cps = [c for c in doc.get("checkpoints") or [] if isinstance(c, dict)]
    failed = [c for c in cps if not c.get("passed")]
    title = f"ftdoctor check: {len(cps)} checkpoint{'s' if len(cps) != 1 else ''}"
    where = ", ".join(f"{k} {v}" for k, v in (("data", doc.get("data")), ("reference", doc.get("reference")),
                                              ("config", doc.get("config"))) if v)
    head = f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(where or 'data-free checks only')}</p>"
    toc = _toc([("failures", "Failures"), ("matrix", "Every check"), ("charts", "Charts"),
                ("checkpoints", "Per checkpoint"), ("settings", "Thresholds and provenance")])
    tone = "pass" if doc.get("passed") else "fail"
    headline = "PASSED: every checkpoint passed every check" if doc.get("passed") else \
        f"FAILED: {len(failed)} of {len(cps)} checkpoint{'s' if len(cps) != 1 else ''} failed"
    verdict = f'<div class="verdict {tone}"><span class="headline">{esc(headline)}</span></div>'
    cards = []
    for c in failed:
        for r in c.get("checks") or []:
            if isinstance(r, dict) and r.get("passed") is False:
                message, cmds = suggested_commands(str(r.get("message", "")))
                cards.append(f'<div class="finding error">{badge("failed", "fail")} <b>{esc(c.get("path"))}</b> '
                             f'<code>{esc(r.get("name"))}</code><p class="msg">{esc(message)}</p>'
                             f'{"".join(command(x) for x in cmds)}</div>')
    names = check_names(cps)
    matrix = []
    for c in cps:
        by = {r.get("name"): r for r in c.get("checks") or [] if isinstance(r, dict)}
        row = [esc(c.get("path")), badge("pass" if c.get("passed") else "fail", "pass" if c.get("passed") else "fail")]
        for n in names:
            r = by.get(n)
            if r is None:
                row.append("")
                continue
            status, mark = _outcome(r.get("passed"))
            shown = "" if status == "skipped" and r.get("value") is None else f" {cell(r.get('value'))}"  # not run
            row.append(f'<span class="{status}" title="{esc(r.get("message", ""))}">{mark}{shown}</span>')
        matrix.append(row)
    per = []
    for c in cps:
        rows = [[esc(r.get("name")), _outcome_badge(r.get("passed")), cell(r.get("value")), cell(r.get("threshold")),
                 f'<span class="text">{esc(r.get("message", ""))}</span>']
                for r in c.get("checks") or [] if isinstance(r, dict)]
        info = f"arch {esc(c.get('arch') or '?')}, sha256 <code>{esc(c.get('sha256') or '?')}</code>"
        per.append(details(f"{esc(c.get('path'))} — {'passed' if c.get('passed') else 'failed'}",
                           f"<p class=\"note\">{info}</p>"
                           + table(("check", "verdict", "value", "threshold", "message"), rows),
                           open_=not c.get("passed")))
    graphs = _svg(charts, ch.check_figure(cf), "each checkpoint's figures against the thresholds")
    settings = pairs((doc.get("thresholds") or {}).items()) + "<h3>Where it came from</h3>" + pairs(
        [("config", doc.get("config")), ("data", doc.get("data")), ("reference", doc.get("reference")),
         ("ftdoctor version", doc.get("ftdoctor_version"))])
    body = (head + toc + verdict
            + section("Failures", "".join(cards) or "<p>No check failed.</p>", "failures")
            + section("Every check", table(("checkpoint", "verdict", *names), matrix), "matrix")
            + (section("Charts", graphs, "charts") if graphs else "")
            + section("Per checkpoint", "".join(per), "checkpoints")
            + section("Thresholds and provenance", settings, "settings") + _footer(doc))
    return title, body


def _outcome(passed: Any) -> tuple[str, str]:
    """A judgement's or a check's outcome → its class and mark: True passed, False failed, anything else
    (None: the check did not run) skipped."""
    if passed is True:
        return "pass", "✓"
    if passed is False:
        return "fail", "✗"
    return "skipped", "–"


def _outcome_badge(passed: Any) -> str:
    status, _ = _outcome(passed)
    return badge(status, status)


# -- trace / compare --------------------------------------------------------------------------------
def _pct(v: Any, signed: bool = False) -> str:
    if not isinstance(v, (int, float)):
        return number(v)
    return f'<span class="num" title="{esc(repr(v))}">{v * 100:{"+" if signed else ""}.2f}</span>'


def dynamics_page(tf: TraceFile, charts: Charts | None) -> tuple[str, str]:
    from ftdoctor.report import dyncharts
    doc = tf.report
    m, d, s = doc.get("model") or {}, doc.get("data") or {}, doc.get("settings") or {}
    what = "compare" if tf.is_compare else "monitor" if tf.is_monitor else "trace"
    title = f"ftdoctor {what}: {_name(m.get('path'))} on {d.get('name', '?')}"
    seeds = sorted({r.seed for r in tf.runs})
    head = (f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(m.get('arch') or 'model')}, "
            f"{cell(d.get('num_classes'))} classes; {esc(', '.join(tf.methods))}; {len(seeds)} seed(s); "
            f"{esc(s.get('optimizer', '?'))} at lr {cell(s.get('lr'))}; accuracy on {esc(d.get('eval_split', '?'))}"
            f" ({cell(d.get('eval_samples'))} examples); the first {tf.window} steps are the early window</p>")
    toc = _toc([("summary", "Summary"), ("charts", "Charts"), ("settings", "Settings and provenance")])
    rows = [r for r in doc.get("methods") or [] if isinstance(r, dict)]
    if rows:
        best = max(rows, key=lambda r: r.get("early_acc_mean") or 0)
        first = rows[0]
        line = (f"{best.get('name')} is best over the first {tf.window} steps: "
                f"{(best.get('early_acc_mean') or 0) * 100:.2f}%")
        if best is not first and isinstance(best.get("diff_vs_first"), (int, float)):
            p = best.get("p_value")
            line += (f", {best['diff_vs_first'] * 100:+.2f} points vs {first.get('name')}"
                     + (f" (paired t, p = {p:.2g})" if isinstance(p, (int, float)) else ""))
        summary = table(("method", f"first {tf.window} steps, %", "± 95% CI", f"Δ vs {first.get('name')}",
                         "± 95% CI", "p (paired t)", "final, %", "± 95% CI"),
                        ([esc(r.get("name")), _pct(r.get("early_acc_mean")), _pct(r.get("early_acc_ci95")),
                          _pct(r.get("diff_vs_first"), signed=True), _pct(r.get("diff_ci95")), number(r.get("p_value")),
                          _pct(r.get("final_acc_mean")), _pct(r.get("final_acc_ci95"))] for r in rows))
        summary += ('<p class="note">± = 95% confidence half-width over the seeds (Student t); every method '
                    "starts from the same backbone and sees the same batches per seed.</p>")
    else:
        final = doc.get("final") or {}
        # a monitored run without the framework's evaluation: the accuracy of its last measured batch
        accuracy = "accuracy on the last measured batch" if tf.accuracy_of_training_batches else "eval accuracy"
        line = (f"{doc.get('method', '?')}: final {accuracy} {(final.get('eval_acc') or 0) * 100:.2f}%, "
                f"mean of the first {tf.window} steps {(final.get('early_acc') or 0) * 100:.2f}%")
        summary = pairs([(k, "none" if isinstance(v, list) and not v else v)       # an empty reinitialised
                         for k, v in final.items() if k != "grad_norm"])
        gn = [g for g in final.get("grad_norm") or [] if isinstance(g, dict)]
        if gn:
            summary += details(f"Gradient norm per layer at the last step ({len(gn)} layers)",
                               table(("layer", "‖∇W‖"), ([esc(g.get("name")), number(g.get("grad_norm"))]
                                                          for g in gn)), open_=len(gn) <= 40)
    verdict = f'<div class="verdict"><span class="headline">{esc(line)}</span></div>'
    graphs = ""
    if charts is not None:
        graphs = _svg(charts, dyncharts.curves_figure(tf), "curves with seed bands")
        heat = [_svg(charts, dyncharts.heatmap_figure(tf, [meth], cols=1, width=7.0, max_height=7.0),
                     f"gradient-norm heat map of {meth}") for meth in tf.methods]
        graphs += ("<h3>Gradient norm per layer and step (RIFLE Fig. 2), one colour scale</h3>"
                   f'<div class="grid">{"".join(heat)}</div>')
        graphs += ("<h3>Every layer's gradient norm at the first and the last step</h3>"
                    + _svg(charts, dyncharts.final_grad_figure(tf), "gradient norm per layer"))
    settings = _provenance({**doc, "settings": {**s, "seed_values": doc.get("seed_values", seeds)}})
    body = (head + toc + verdict + section("Summary", summary, "summary")
            + (section("Charts", graphs, "charts") if graphs else "")
            + section("Settings and provenance", settings, "settings") + _footer(doc))
    return title, body
