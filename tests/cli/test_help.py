"""What a first run sees: `--version`, and `--help` text without markup leaks or `<bool>` labels on flags."""
from __future__ import annotations

import pytest

from helpers import run_cli
from ftdoctor import __version__

COMMANDS = ["inspect", "probe", "fix", "check", "trace", "compare", "plot", "demo"]


def test_version():
    code, out, err = run_cli("--version")
    assert code == 0 and out.strip() == f"ftdoctor {__version__}", out + err


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_markup_and_no_bool_labels(command):
    code, out, err = run_cli(*([command] if command else []), "--help", env={"COLUMNS": "100"})
    assert code == 0, err
    for leak in ("<bool>", "[bold", "[/", "[dim", "SPEC"):
        assert leak not in out, f"{leak!r} in `ftdoctor {command} --help`"
    assert "--help" in out


def test_the_plot_extra_is_printed_as_typed():
    code, out, _ = run_cli("plot", "--help", env={"COLUMNS": "200"})
    assert code == 0 and "pip install 'ftdoctor[plot]'" in out
