"""The monitoring example (docs/monitoring.md) runs as printed (a few steps here) and its HDF5 file draws."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monitor_trainer.py"


def test_the_trainer_example_writes_a_run_that_plot_draws(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("monitor_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    h5 = module.main(["--out", str(tmp_path / "run"), "--steps", "4"])
    out = capsys.readouterr().out
    assert "measured steps [0, 1, 2]" in out and "ftdoctor/noise_fraction" in out
    from ftdoctor.report.plot import plot
    page = plot(h5, tmp_path / "run.html")
    assert "<svg" in page.read_text()
