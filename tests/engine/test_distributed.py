"""Two processes (gloo on CPU) give the single-process figures (SPEC §7)."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import SmallCNN, make_bundle
from ftdoctor import distributed
from ftdoctor.diagnose import ProbeOptions, probe_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _figures(mode: str) -> dict:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4).eval()
    ref = SmallCNN(num_classes=4).eval()
    bundle = make_bundle((3, 8, 8), n=37, num_classes=4, batch_size=10)   # uneven: 10, 10, 10, 7
    run = probe_model(model, bundle, ProbeOptions(change_rate_mode=mode, seed=5), reference=ref)
    out = {name: res.figures.to_json() for name, res in run.results.items()}
    out["arrays"] = {f"{name}/{k}": v.tolist() for name, res in run.results.items() for k, v in res.arrays.items()}
    return out


def _worker(rank: int, world: int, port: int, mode: str, path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        figs = _figures(mode)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(figs, f)
    finally:
        distributed.teardown()


def _close(a, b, path="") -> list[str]:
    if isinstance(a, dict):
        return [m for k in a for m in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        assert len(a) == len(b), path
        return [m for i, (x, y) in enumerate(zip(a, b)) for m in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        ok = math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
        return [] if ok else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_two_processes_equal_one(tmp_path, mode):
    single = json.loads(json.dumps(_figures(mode)))
    path = str(tmp_path / "rank0.json")
    mp.spawn(_worker, args=(2, _free_port(), mode, path), nprocs=2, join=True)
    with open(path) as f:
        multi = json.load(f)
    bad = _close(single, multi)
    assert not bad, bad[:5]
    assert single["grad_norm"]["layers"][0]["grad_norm"] > 0
