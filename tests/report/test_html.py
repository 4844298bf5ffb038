"""The HTML page: one self-contained file that carries every figure of the JSON report, escapes what came
from files, is the same page from memory and from the HDF5 file, and the Markdown that stays short."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftdoctor.report import content, html, markdown

from helpers import run_cli

pytest.importorskip("matplotlib")


def floats(doc, path=""):
    """Every float of a JSON document, with where it is."""
    if isinstance(doc, float):
        yield path, doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield from floats(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from floats(v, f"{path}[{i}]")


def copy_blocks(page: str) -> list[str]:
    """The text of every copy-ready command block, as the copy button takes it (its text content)."""
    import html as std_html
    blocks = re.findall(r'<div class="cmd"><code>(.*?)</code>', page, re.S)
    return [std_html.unescape(re.sub(r"<[^>]+>", "", b)) for b in blocks]


def outside_references(page: str) -> list[str]:
    """Every attribute or CSS reference that would make a browser fetch something outside the file."""
    refs = re.findall(r"""(?:src|href|xlink:href|action|poster|data)\s*=\s*["']([^"']*)["']""", page)
    refs += re.findall(r"url\(\s*['\"]?([^'\")]*)", page) + re.findall(r"@import\s+['\"]?([^'\";]*)", page)
    return [r for r in refs if not (r.startswith(("data:", "#")) or r == "")]


@pytest.mark.parametrize("kind", ["probe", "check", "compare", "trace"])
def test_page_is_self_contained(report_pages, kind):
    page = report_pages[kind].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert outside_references(page) == []
    assert "default-src &#x27;none&#x27;" in page                  # the browser refuses any request the page might try
    assert page.count("<svg") >= 1                        # charts inline


@pytest.mark.parametrize("kind", ["probe", "check", "compare", "trace"])
def test_page_carries_every_figure_of_the_json_report(report_pages, kind):
    """Every float of the JSON report appears in the page exactly (a cell shows its digits, the exact value is
    the cell's title)."""
    page = report_pages[kind].read_text(encoding="utf-8")
    doc = json.loads(report_pages[kind].with_suffix(".json").read_text())
    found = list(floats(doc.get("probes") or doc.get("checkpoints") or doc.get("methods") or doc.get("final")))
    assert len(found) >= (500 if kind == "probe" else 10)
    missing = [(where, v) for where, v in found if f'title="{v!r}"' not in page]
    assert missing == []


def test_probe_page_says_verdict_findings_thresholds_and_provenance(report_pages):
    page = report_pages["probe"].read_text(encoding="utf-8")
    doc = json.loads(report_pages["probe"].with_suffix(".json").read_text())
    assert page.index('class="verdict') < page.index('id="findings"') < page.index('id="charts"')
    commands = copy_blocks(page)
    for f in doc["findings"]:
        if f["suggestion"]:
            assert f["suggestion"] in commands                # copy-ready, as printed in the terminal
    assert doc["model"]["sha256"] in page and doc["torch_version"] in page
    for key in ("max_change_rate_spread", "min_depth_ratio", "min_r2_median", "max_drift_rel"):
        assert f"<td>{key}</td>" in page                      # each figure against its threshold
    assert "stages.48.2" in page and "floor 1/(C−1)" in page
    assert doc["settings"]["thresholds"]["max_noise_fraction"] == "2x"


def test_the_page_from_the_hdf5_file_is_the_page_of_the_run(report_pages, tmp_path):
    h5 = report_pages["probe"].with_suffix(".h5")
    res = run_cli("plot", h5, "-o", tmp_path / "again.html", "--quiet")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.html").read_bytes() == report_pages["probe"].read_bytes()
    for kind in ("compare", "trace"):
        res = run_cli("plot", report_pages[kind].with_suffix(".h5"), "-o", tmp_path / f"{kind}.html", "--quiet")
        assert (tmp_path / f"{kind}.html").read_bytes() == report_pages[kind].read_bytes()


def test_text_from_files_is_escaped():
    doc = {"schema": "ftdoctor.report/1", "model": {"path": "<img src=x onerror=alert(1)>.pt"},
           "data": {"name": "</script><script>alert(2)</script>"},
           "probes": {"grad_norm": {"depth_ratio": 0.5, "head": "fc", "layers": [
               {"name": "<b>evil</b>", "grad_norm": 0.25}, {"name": "fc", "grad_norm": 0.5}]}},
           "findings": [{"probe": "x", "severity": "warning", "message": "<i>m</i>", "suggestion": "a && b"}],
           "skipped": [], "notes": ["<u>n</u>"]}
    page = html.render(content.ProbeFile(doc, {}))
    for raw in ("<img src=x", "<script>alert", "<b>evil</b>", "<i>m</i>", "<u>n</u>"):
        assert raw not in page
    assert "&lt;b&gt;evil&lt;/b&gt;" in page and copy_blocks(page) == ["a && b"]
    embedded = re.search(r'<script type="application/json" id="ftdoctor-report">(.*?)</script>', page, re.S)
    assert json.loads(embedded.group(1))["data"]["name"] == doc["data"]["name"]


def test_page_without_matplotlib_has_the_tables_and_says_how_to_get_charts(monkeypatch):
    monkeypatch.setattr(html, "have_matplotlib", lambda: False)
    doc = {"model": {"path": "m.pt"}, "data": {"name": "d"}, "probes": {"grad_norm": {
        "depth_ratio": 0.5, "layers": [{"name": "conv1", "grad_norm": 0.125}]}}, "findings": [], "skipped": []}
    page = html.render(content.ProbeFile(doc, {}))
    assert "<svg" not in page and "pip install 'ftdoctor[plot]'" in page and 'title="0.125"' in page
    assert 'href="#charts"' not in page


def test_html_lands_nowhere_near_an_input_and_a_failed_run_leaves_none(report_pages, tmp_path):
    model = report_pages["probe"].parent / "deep.pt"
    res = run_cli("probe", model, "--arch", "helpers:DeepNet", "--data", "shapes", "--html", model)
    assert res.exit_code == 2 and "--html" in res.stderr
    page = tmp_path / "p.html"
    res = run_cli("probe", tmp_path / "missing.pt", "--data", "shapes", "--html", page)
    assert res.exit_code == 2 and not page.exists()


def test_markdown_is_short_with_the_tables_folded(report_pages):
    doc = json.loads(report_pages["probe"].with_suffix(".json").read_text())
    text = markdown.render(doc)
    first = text.splitlines()[0]
    assert first.startswith("### ftdoctor probe:") and ("Needs attention" in first or "Healthy" in first)
    folded = text[text.index("<details>"):]
    assert "stages.48.2" in folded and "stages.48.2" not in text[:text.index("<details>")]
    visible = text[:text.index("<details>")]
    assert len(visible.splitlines()) < 40
    check = markdown.render_check(json.loads(report_pages["check"].with_suffix(".json").read_text()))
    assert check.startswith("### ftdoctor check — ") and "<details>" in check


def test_check_page_lists_failures_with_their_commands(report_pages):
    page = report_pages["check"].read_text(encoding="utf-8")
    doc = json.loads(report_pages["check"].with_suffix(".json").read_text())
    for cp in doc["checkpoints"]:
        assert html.esc(cp["path"]) in page and cp["sha256"] in page
        for c in cp["checks"]:
            _, commands = html.suggested_commands(c["message"])
            for cmd in commands:
                assert cmd in copy_blocks(page)
    assert ("PASSED" in page) == doc["passed"]


def test_plot_refuses_what_it_cannot_tell(tmp_path, report_pages):
    res = run_cli("plot", report_pages["probe"].with_suffix(".h5"), "-o", tmp_path / "x.htm")
    assert res.exit_code == 2 and ".html" in res.stderr
    assert not Path(tmp_path / "x.htm").exists()


def test_dollar_signs_in_names_are_text_not_mathtext(tmp_path):
    """A layer or file name with ``$`` is drawn as it is (mathtext would fail on ``$\\frac$`` or print
    something else)."""
    from ftdoctor.report import hdf5 as hdf5_report
    doc = {"schema": "ftdoctor.report/1", "model": {"path": "odd$\\frac$name.pt"}, "data": {"name": "d"},
           "probes": {"grad_norm": {"depth_ratio": 0.5, "head": "fc", "layers": [
               {"name": "a$\\frac$b", "grad_norm": 0.25}, {"name": "fc", "grad_norm": 0.5}]}},
           "findings": [], "skipped": []}
    hdf5_report.write(tmp_path / "p.h5", "ftdoctor.report/1", doc, {})
    for out in ("p.html", "p.png", "p.svg"):
        assert run_cli("plot", tmp_path / "p.h5", "-o", tmp_path / out, "--quiet").exit_code == 0
    assert "a$\\frac$b" in (tmp_path / "p.svg").read_text() or "a$\\\\frac$b" in (tmp_path / "p.svg").read_text()


def test_a_damaged_report_is_a_one_line_error(tmp_path):
    from ftdoctor.report import hdf5 as hdf5_report
    doc = {"schema": "ftdoctor.report/1", "model": {"path": "m.pt"}, "data": {"name": "d"},
           "probes": {"grad_norm": {"depth_ratio": 0.5, "layers": [{"name": "a", "grad_norm": 0.25}]},
                      "change_rate": "not a dict"}, "findings": "nope", "skipped": [], "window": "<script>"}
    hdf5_report.write(tmp_path / "p.h5", "ftdoctor.report/1", doc, {})
    for out in ("p.html", "p.png"):
        res = run_cli("plot", tmp_path / "p.h5", "-o", tmp_path / out)
        assert res.exit_code in (0, 2) and "Traceback" not in res.output, res.output
        assert (res.exit_code == 0) == (tmp_path / out).exists()
