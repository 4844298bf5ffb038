"""Shared test fixtures: tiny models, importable test nets and checkpoints in a working directory.

(What tests share that is not a fixture — the tiny models, the in-memory bundle, the CLI runner — lives in
``helpers.py``: ``from helpers import SmallCNN, make_bundle, run_cli``.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import NETS_SOURCE, SmallCNN

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """ftdoctor's cache (timm signatures) in a folder of the test session, not in the user's home."""
    os.environ["FTDOCTOR_CACHE"] = str(tmp_path_factory.mktemp("ftdoctor-cache"))
    yield


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def nets_dir(tmp_path: Path) -> Path:
    """A working directory holding the importable test nets (``--arch ftd_hostile_nets:SmallCNN``)."""
    (tmp_path / "ftd_hostile_nets.py").write_text(NETS_SOURCE)
    sys.modules.pop("ftd_hostile_nets", None)
    return tmp_path


@pytest.fixture
def good_model(nets_dir: Path) -> Path:
    """A valid state dict of SmallCNN (10 classes) in the working directory."""
    import torch
    sys.path.insert(0, str(nets_dir))
    try:
        import ftd_hostile_nets
        torch.manual_seed(0)
        model = ftd_hostile_nets.SmallCNN(10)
    finally:
        sys.path.remove(str(nets_dir))
    path = nets_dir / "good.pt"
    torch.save(model.state_dict(), path)
    return path
