"""Ctrl-C or SIGTERM at any moment of ``probe`` and ``fix``: all outputs or none, and a truthful message.

Each case runs ftdoctor in a child process that sends itself the signal at one chosen moment (the
harness in hostile.py wraps one function), plus a signal sent from outside mid-run.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import ARCH, assert_clean, run_child

PROBE_OUTPUTS = ("--output", "r.json", "--hdf5", "r.h5")
FIX = ("--method", "rifle", "--data", "shapes:10", "--max-samples", "64", "--quiet", "-o", "out.pt")
CODE = {"SIGINT": 130, "SIGTERM": 143}


def _probe(nets_dir: Path, good_model: Path, **kw):
    return run_child(nets_dir, "probe", good_model, *ARCH, "--data", "shapes:10", "--max-samples", "64",
                     "--quiet", *PROBE_OUTPUTS, **kw)


@pytest.mark.parametrize("moment, signame", [
    ("load", "SIGTERM"), ("pass", "SIGINT"), ("between", "SIGTERM"), ("writing", "SIGINT"),
])
def test_probe_interrupted_before_its_outputs_are_complete_leaves_nothing(good_model, nets_dir, moment, signame):
    o = _probe(nets_dir, good_model, harness=(moment, signame))
    assert_clean(o, CODE[signame], mentions=(f"interrupted ({'Ctrl-C' if signame == 'SIGINT' else signame})",
                                             "nothing was written"))


@pytest.mark.parametrize("moment, signame", [
    ("load", "SIGINT"), ("pass", "SIGTERM"), ("between", "SIGINT"), ("writing", "SIGTERM"),
])
def test_fix_interrupted_before_its_outputs_are_complete_leaves_nothing(good_model, nets_dir, moment, signame):
    (nets_dir / "out.pt").write_bytes(b"an older checkpoint the user asked to replace")
    o = run_child(nets_dir, "fix", good_model, *ARCH, *FIX, "--force", "--new-head", harness=(moment, signame))
    assert_clean(o, CODE[signame], mentions=("nothing was written",))
    assert (nets_dir / "out.pt").read_bytes() == b"an older checkpoint the user asked to replace"


def test_a_signal_while_outputs_are_made_final_is_held_until_they_are(good_model, nets_dir):
    o = run_child(nets_dir, "fix", good_model, *ARCH, *FIX, "--new-head", harness=("commit", "SIGTERM"))
    assert o.code == 143 and "after the outputs were complete" in o.err and "Traceback" not in o.err, o.err
    assert sorted(o.created) == ["out.pt", "out.pt.ftdoctor.json"]
    record = json.loads((nets_dir / "out.pt.ftdoctor.json").read_text())
    written = torch.load(nets_dir / "out.pt")
    assert record["verification"]["passed"] and written["fc.weight"].shape == (10, 32)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_from_outside_mid_run_leaves_nothing(good_model, nets_dir, signum):
    data = nets_dir / "big.npz"
    np.savez(data, x=np.zeros((32768, 16, 16, 3), np.uint8), y=np.arange(32768) % 10)
    # ~20 s of work at batch 4 (startup takes ~4 s): the signal comes mid-pass
    o = run_child(nets_dir, "probe", good_model, *ARCH, "--data", data, "--max-samples", "32768", "--quiet",
                  "--batch-size", "4", *PROBE_OUTPUTS, signal_after=(8.0, signum), root=nets_dir)
    assert o.code == (143 if signum == signal.SIGTERM else 130), (o.code, o.err)
    assert_clean(o, o.code, mentions=("nothing was written",))
