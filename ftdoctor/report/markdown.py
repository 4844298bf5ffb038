"""Probe and check reports as Markdown for pull-request comments: short on the page — the verdict, the
summary and the findings with their commands — and every per-layer figure folded inside ``<details>``."""
from __future__ import annotations

from typing import Any

from ftdoctor.report.content import SEVERITIES, check_names, probe_verdict
from ftdoctor.report.formats import text_format
from ftdoctor.report.table import layer_rows, summary_items

_MARK = {"pass": "✅", "warn": "⚠️", "fail": "❌"}


def _cell(text: str) -> str:
    """Table-safe text: a ``|`` would end the cell, a newline the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def _folded(summary: str, body: list[str]) -> list[str]:
    return ["", f"<details><summary>{summary}</summary>", "", *body, "", "</details>"]


def render(doc: dict[str, Any]) -> str:
    m, d = doc["model"], doc["data"]
    findings = sorted(doc["findings"], key=lambda f: SEVERITIES.index(f["severity"])
                      if f["severity"] in SEVERITIES else 3)
    tone, head, tally = probe_verdict(findings)
    lines = [f"### ftdoctor probe: `{m['path']}` — {_MARK[tone]} {head} ({tally})", "",
             f"Model `{m['arch']}` ({m['format']}, {m['num_params']:,} parameters, head `{m['head']}`, "
             f"{m['num_classes']} classes) on `{d['name']}` ({d['split']}, {d['num_samples']} examples).", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary_items(doc)]
    lines += ["", "#### Findings", ""]
    if not findings:
        lines.append("No findings.")
    for f in findings:
        lines.append(f"- **{f['severity']}** ({f['probe']}): {f['message']}")
        if f.get("suggestion"):
            lines += ["", "  ```sh", f"  {f['suggestion']}", "  ```"]
    header, rows = layer_rows(doc)
    if rows:
        lines += _folded(f"Per-layer figures ({len(rows)} layers)", _table(header, rows))
    if doc["skipped"]:
        lines += _folded(f"Not measured ({len(doc['skipped'])})",
                         [f"- `{s['name']}` ({s['probe']}): {s['reason']}" for s in doc["skipped"]])
    return "\n".join(lines) + "\n"


def render_check(doc: dict[str, Any]) -> str:
    cps = doc["checkpoints"]
    failed = [c for c in cps if not c["passed"]]
    head = ("✅ PASSED: every checkpoint passed every check" if doc["passed"]
            else f"❌ FAILED: {len(failed)} of {len(cps)} checkpoint{'s' if len(cps) != 1 else ''} failed")
    lines = [f"### ftdoctor check — {head}", ""]
    for c in failed:
        lines += [f"- `{c['path']}`"] + [f"  - **{r['name']}**: {r['message']}" for r in c["checks"]
                                        if r["passed"] is False]
    names = check_names(cps)
    rows = []
    for c in cps:
        by = {r["name"]: r for r in c["checks"]}
        rows.append([f"`{c['path']}`"] + [
            "" if n not in by else {True: "✓", False: "✗"}.get(by[n]["passed"], "–") for n in names])
    lines += _folded(f"Every check of {len(cps)} checkpoint{'s' if len(cps) != 1 else ''}",
                     _table(["checkpoint", *names], rows))
    return "\n".join(lines) + "\n"


text_format("markdown", {"probe", "check"},
            lambda result: (render if result.kind == "probe" else render_check)(result.to_json()),
            "Probe and check reports for pull-request comments: the verdict and findings; the tables folded.")
