"""Fixtures of the fix tests (helpers that are not fixtures live in ``fixhelp``)."""
from __future__ import annotations

import sys

import pytest

from fixhelp import NETS


@pytest.fixture
def nets(tmp_path_factory, monkeypatch):
    """The module ``ftd_fixnets`` (importable here and by the loader via the working directory)."""
    d = tmp_path_factory.mktemp("fixnets")
    (d / "ftd_fixnets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.chdir(d)
    sys.modules.pop("ftd_fixnets", None)
    import ftd_fixnets
    return ftd_fixnets
