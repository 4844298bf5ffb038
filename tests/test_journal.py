"""Nested journals (``ftdoctor demo`` runs probe and fix steps inside one): what an earlier step wrote may be
read by a later one; what is planned and not yet written may not; a failure undoes every step."""
from __future__ import annotations

from pathlib import Path

import pytest

from ftdoctor.errors import FtdoctorError
from ftdoctor.outputs import Output, atomic_write, journal


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def test_a_later_step_may_read_what_an_earlier_step_wrote(tmp_path):
    model, report = tmp_path / "fixed.pt", tmp_path / "report.json"
    with journal():
        with journal([Output(model, "-o", replace=False)], [tmp_path / "source.pt"]):
            _write(model, "weights")
        with journal([Output(report, "--output")], [model]):      # probe the fixed model
            _write(report, "{}")
    assert model.read_text() == "weights" and report.read_text() == "{}"


def test_a_step_may_not_read_an_output_still_to_be_written(tmp_path):
    out = tmp_path / "out.pt"
    with journal([Output(out, "-o", replace=False)]):
        with pytest.raises(FtdoctorError, match="refusing to overwrite the input"):
            with journal((), [out]):
                pass


def test_a_failure_in_a_later_step_undoes_the_earlier_steps(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.json"
    with pytest.raises(FtdoctorError):
        with journal():
            with journal([Output(first, "-o", replace=False)]):
                _write(first, "weights")
            with journal([Output(second, "--output")], [first]):
                _write(second, "{}")
                raise FtdoctorError("the pass failed", "try again")
    assert not first.exists() and not second.exists()
