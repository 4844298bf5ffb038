"""The probe report as a Markdown document (for pull-request comments and notebooks)."""
from __future__ import annotations

from typing import Any

from ftdoctor.report.formats import text_format
from ftdoctor.report.table import layer_rows, summary_items


def render(doc: dict[str, Any]) -> str:
    m, d = doc["model"], doc["data"]
    lines = [f"# ftdoctor probe: `{m['path']}`", "",
             f"Model `{m['arch']}` ({m['format']}, {m['num_params']:,} parameters, head `{m['head']}`, "
             f"{m['num_classes']} classes) on `{d['name']}` ({d['split']}, {d['num_samples']} examples).", "",
             "## Summary", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary_items(doc)]
    header, rows = layer_rows(doc)
    if rows:
        lines += ["", "## Layers", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Findings", ""]
    if not doc["findings"]:
        lines.append("No findings.")
    for f in doc["findings"]:
        s = f"- **{f['severity']}** ({f['probe']}): {f['message']}"
        if f.get("suggestion"):
            s += f"  \n  suggestion: `{f['suggestion']}`"
        lines.append(s)
    if doc["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{s['name']}` ({s['probe']}): {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


text_format("markdown", {"probe"}, lambda result: render(result.to_json()),
            "The probe report for pull-request comments and notebooks.")
