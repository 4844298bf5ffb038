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


@pytest.fixture(scope="session")
def report_pages(tmp_path_factory):
    """HTML pages written by the real commands, for the page and browser tests: a probe of a 100-layer net
    against a reference (with its HDF5 file and JSON), a check of two checkpoints, a 5-method compare and a
    trace."""
    from helpers import DeepNet, run_cli
    work = tmp_path_factory.mktemp("pages")
    torch.manual_seed(0)
    deep = DeepNet()
    torch.save(deep.state_dict(), work / "reference.pt")
    with torch.no_grad():
        for p in deep.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(deep.state_dict(), work / "deep.pt")
    torch.save(SmallCNN(10).state_dict(), work / "small.pt")
    arch = ("--arch", "helpers:DeepNet")
    out = {}
    for name, args in {
        "probe": ("probe", work / "deep.pt", *arch, "--data", "shapes", "--max-samples", "64", "--reference",
                  work / "reference.pt", "--output", work / "probe.json", "--hdf5", work / "probe.h5"),
        "check": ("check", work / "deep.pt", work / "reference.pt", *arch, "--data", "shapes", "--max-samples", "64",
                  "--format", "json", "--output", work / "check.json"),
        "compare": ("compare", work / "small.pt", "--arch", "helpers:SmallCNN", "--data", "shapes", "--max-samples",
                    "64", "--eval-samples", "32", "--methods", "base,warmup,entame,rifle,l2sp", "--seeds", "2",
                    "--steps", "6", "--window", "3", "--hdf5", work / "compare.h5", "--output",
                    work / "compare.json"),
        "trace": ("trace", work / "small.pt", "--arch", "helpers:SmallCNN", "--data", "shapes", "--max-samples",
                  "64", "--eval-samples", "32", "--method", "rifle", "--steps", "6", "--window", "3", "--hdf5",
                  work / "trace.h5", "--output", work / "trace.json"),
    }.items():
        res = run_cli(*args, "--html", work / f"{name}.html", "--quiet")
        assert res.exit_code in (0, 1) and (work / f"{name}.html").is_file(), res.output
        out[name] = work / f"{name}.html"
    return out
