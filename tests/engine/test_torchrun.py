"""`torchrun --nproc_per_node 2 -m ftdoctor probe` prints the single-process JSON (SPEC §7)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

from helpers import SmallCNN, torchrun


def _numbers_close(a, b, path="") -> list[str]:
    if isinstance(a, dict):
        return [m for k in a for m in _numbers_close(a[k], b.get(k), f"{path}.{k}")]
    if isinstance(a, list):
        return [m for i, (x, y) in enumerate(zip(a, b)) for m in _numbers_close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_torchrun_two_processes_print_the_single_process_report(tmp_path):
    torch.manual_seed(0)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where helpers.py lives
    (tmp_path / "nets.py").write_text("import sys; sys.path.insert(0, %r)\nfrom helpers import SmallCNN, torchrun\n" % tests_dir)
    model = SmallCNN(num_classes=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.save(SmallCNN(num_classes=4).state_dict(), tmp_path / "ref.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((45, 3, 8, 8)).astype("float32"),
             y=rng.integers(0, 4, 45))
    args = ["probe", "m.pt", "--arch", "nets:SmallCNN", "--data", "d.npz", "--normalize", "none",
            "--max-samples", "45", "--batch-size", "10", "--reference", "ref.pt", "--seed", "3",
            "--format", "json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "ftdoctor", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = torchrun(["-m", "ftdoctor", *args], cwd=tmp_path, env=env)
    a, b = json.loads(single.stdout), json.loads(multi.stdout)      # rank 0 alone printed one document
    bad = _numbers_close(a["probes"], b["probes"])
    assert not bad, bad[:5]
    assert a["data"] == b["data"] and len(a["probes"]["grad_norm"]["layers"]) == 3
