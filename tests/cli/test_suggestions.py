"""Every command ftdoctor prints runs as printed: each suggestion the probes can emit — from `check` hints and
probe findings, with non-default data flags — is taken from the printed text and run as it stands."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from ftdoctor.thresholds import Thresholds

ARCH = ("--arch", "ftd_hostile_nets:SmallCNN")
# non-default data flags a suggestion must carry to use the same examples
DATA_FLAGS = ("--normalize", "none", "--max-samples", "40", "--batch-size", "8", "--split", "test")
# thresholds every figure fails, so that every verdict and its suggestion appears
STRICT = ("--max-noise-fraction", "0", "--max-excess-noise-fraction", "0", "--max-change-rate-spread", "1",
          "--max-change-rate-cv", "0", "--min-depth-ratio", "1000000", "--min-r2-median", "1",
          "--max-drift-rel", "0")
COMMAND = re.compile(r"ftdoctor (?:fix|trace|inspect|probe|check) [^`()]+")


@pytest.fixture
def run_dir(nets_dir: Path, good_model: Path, monkeypatch) -> Path:
    """The test nets, a checkpoint, a different reference and a .npz with a test split, 4 classes."""
    monkeypatch.chdir(nets_dir)
    monkeypatch.syspath_prepend(str(nets_dir))
    import ftd_hostile_nets
    torch.manual_seed(1)
    torch.save(ftd_hostile_nets.SmallCNN(10).state_dict(), nets_dir / "ref.pt")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (48, 8, 8, 3), dtype=np.uint8)
    np.savez(nets_dir / "d.npz", x_test=images, y_test=np.arange(48) % 4, x_train=images, y_train=np.arange(48) % 4)
    return nets_dir


def _printed_commands(texts: list[str]) -> list[str]:
    """The commands inside printed texts (one text may hold two: RIFLE's fix, then its periodic trace)."""
    return sorted({m.group(0).strip() for text in texts for m in COMMAND.finditer(text)})


def _runs_as_printed(command: str, cwd: Path) -> None:
    argv = shlex.split(command)
    assert argv[0] == "ftdoctor"
    code, out, err = run_cli(*argv[1:], "--quiet") if argv[1] != "inspect" else run_cli(*argv[1:])
    assert code == 0, f"`{command}` exited {code}:\n{err}"
    for leftover in ("FIXED.pt", "FIXED.pt.ftdoctor.json", "trace.h5"):
        (cwd / leftover).unlink(missing_ok=True)


def test_every_check_hint_runs_as_printed(run_dir):
    code, out, err = run_cli("check", "good.pt", *ARCH, "--data", "d.npz", *DATA_FLAGS, "--new-head",
                             "--reference", "ref.pt", *STRICT, "--format", "json")
    assert code == 1, err
    report = json.loads(out)
    commands = _printed_commands([r["message"] for c in report["checkpoints"] for r in c["checks"]])
    methods = {re.search(r"--method (\S+)", c).group(1) for c in commands}
    assert methods == {"entame", "rescale", "datadep", "rifle", "l2sp"}, commands
    for command in commands:
        assert "--arch ftd_hostile_nets:SmallCNN" in command and all(f in command for f in DATA_FLAGS[:4])
        _runs_as_printed(command, run_dir)


def test_every_probe_finding_runs_as_printed(run_dir):
    """The probe report's findings, with every threshold failing (through the library: `probe` has no
    threshold flags), including the second command a finding may carry (RIFLE's periodic re-init)."""
    from ftdoctor.checkpoint import ModelOptions
    from ftdoctor.data import DataOptions
    from ftdoctor.diagnose import ProbeOptions, probe

    strict = Thresholds(max_noise_fraction=0, max_excess_noise_fraction=0, max_change_rate_spread=1,
                        max_change_rate_cv=0, min_depth_ratio=1e6, min_r2_median=1, max_drift_rel=0)
    report = probe("good.pt", model=ModelOptions(arch=ARCH[1]),
                   data=DataOptions(data="d.npz", normalize="none", max_samples=40, batch_size=8, split="test"),
                   options=ProbeOptions(new_head=True, thresholds=strict), reference="ref.pt")
    commands = _printed_commands([f["suggestion"] or "" for f in report.to_json()["findings"]])
    assert sum(c.startswith("ftdoctor trace") for c in commands) == 2, commands     # l2sp and rifle
    assert sum(c.startswith("ftdoctor fix") for c in commands) >= 4, commands
    for command in commands:
        _runs_as_printed(command, run_dir)


def test_the_nan_advice_names_a_command_that_runs(run_dir):
    import ftd_hostile_nets
    model = ftd_hostile_nets.SmallCNN(10)
    model.load_state_dict(torch.load("good.pt"))
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    torch.save(model.state_dict(), "nan.pt")
    code, out, err = run_cli("probe", "nan.pt", *ARCH, "--data", "d.npz", *DATA_FLAGS, "--format", "json",
                             "--new-head")
    findings = json.loads(out)["findings"]
    commands = _printed_commands([f["suggestion"] or "" for f in findings])
    assert commands and all(c.startswith("ftdoctor inspect nan.pt --arch") for c in commands), findings
    for command in commands:
        _runs_as_printed(command, run_dir)
