"""JSON documents: deterministic text (sorted by construction, no timings), written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftdoctor.outputs import atomic_write
from ftdoctor.report.formats import text_format


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write(doc: dict[str, Any], path: str | Path) -> None:
    text = dumps(doc)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


text_format("json", {"probe", "check", "inspect", "trace", "compare", "fix"}, lambda result: dumps(result.to_json()),
            "Every result as its JSON document (SPEC §3): deterministic, no timings.")
