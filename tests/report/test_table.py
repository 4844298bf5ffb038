"""The probe table at any terminal width: numbers whole (bars, the kind column, then whole tables give way),
skipped layers one line per reason."""
from __future__ import annotations

import re

import pytest
from rich.console import Console

from ftdoctor.numbers import fmt
from ftdoctor.report.table import fitted_tables, render, skipped_lines


def _doc(layers: int = 24) -> dict:
    names = [f"encoder.layers.encoder_layer_{i // 2}.mlp.{3 * (i % 2)}" for i in range(layers)] + ["heads.head"]
    rates = [{"name": n, "kind": "Linear", "change_rate": 1.2345e-3 * (i + 1), "cv": 0.5 + i / 7,
              "column_cv": 0.1} for i, n in enumerate(names)]
    norms = [{"name": n, "kind": "Linear", "grad_norm": 3.21e-2 * (i + 1), "to_head": (i + 1) / len(names)}
             for i, n in enumerate(names)]
    r2 = [{"name": n, "median": 0.987654, "identity_median": 0.91} for n in names[:-1]]
    drift = [{"name": n, "rel": 1.5e-3 * i} for i, n in enumerate(names[:-1])]
    skipped = [{"name": f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", "probe": "all",
                "reason": "used outside a module's own forward"} for i in range(12)]
    skipped += [{"name": "heads.head", "probe": "change_rate", "reason": "its weight is all zeros"}]
    return {"model": {"path": "m.pt", "arch": "vit", "format": "state_dict", "num_params": 1000, "head": "heads.head",
                      "num_classes": 5},
            "data": {"name": "shapes:5", "split": "train", "num_samples": 64, "num_classes": 5, "subset": None},
            "probes": {"change_rate": {"spread": 2.0, "log_std": 0.1, "mode": "exact", "loss": "random",
                                       "layers": rates},
                       "grad_norm": {"depth_ratio": 0.5, "layers": norms},
                       "r2": {"layers": r2}, "drift": {"layers": drift}},
            "skipped": skipped, "findings": []}


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_no_number_is_cut_at_any_width(width):
    doc = _doc()
    console = Console(width=width, record=True, color_system=None)
    render(doc, console)
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    tables = fitted_tables(doc, width)
    cells = [c for _, rows in tables for r in rows for c in r[1:] if c and c != "–"]
    for cell in cells:
        assert cell.split()[-1] in text                       # every number printed whole
    for p in doc["probes"]["change_rate"]["layers"]:
        assert fmt(p["change_rate"]) in text and fmt(p["cv"]) in text
    assert not re.search(r"\d…", text)                        # no number ends in an ellipsis
    if width >= 160:
        assert len(tables) == 1 and "█" in text               # wide: one table with its bars
    if width <= 80:
        assert len(tables) > 1                                # narrow: stacked, the names repeated


def test_skipped_layers_are_grouped_by_reason():
    lines = skipped_lines(_doc()["skipped"])
    assert len(lines) == 2
    assert lines[0].startswith("skipped [all] 12 layers (encoder.layers.encoder_layer_0.self_attention"
                               ".in_proj_weight, ") and "(9 more)" in lines[0]
    assert lines[1] == "skipped [change_rate] heads.head: its weight is all zeros"
