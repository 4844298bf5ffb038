"""How figures are written for people: a few significant digits, scientific notation at the extremes."""
from __future__ import annotations

from typing import Any


def fmt(v: Any, digits: int = 3) -> str:
    """``v`` in at most ``digits`` significant digits ("–" for a missing figure, 1.2e-05 for tiny ones)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def plain(v: Any, missing: str = "–", spec: str = ".4g") -> str:
    """``v`` for a table cell or a report line: booleans in lower case, floats with ``spec``."""
    if v is None:
        return missing
    if isinstance(v, bool):
        return str(v).lower()
    return format(v, spec) if isinstance(v, float) else str(v)
