"""The monitor under DDP: two CPU processes (gloo, torchrun) training one model on halves of each batch give
the single-process figures at every measuring step; rank 0 alone warns."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import assert_figures_close, torchrun

SCRIPT = r'''
import json, os, sys
import torch, torch.nn as nn, torch.nn.functional as F
from ftdoctor.monitor import Monitor, Schedule

distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
else:
    rank, world = 0, 1
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 16), nn.LayerNorm(16),
                    nn.ReLU(), nn.Linear(16, 4)).double()
model = nn.parallel.DistributedDataParallel(net) if distributed else net
monitor = Monitor(net, schedule=Schedule(every=2, first=1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(1)
out = []
for step in range(3):
    x = torch.randn(12, 3, 10, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=g)
    share = slice(rank * 12 // world, (rank + 1) * 12 // world)      # rank r: its half of the global batch
    monitor.begin(step, labels=y[share])
    F.cross_entropy(model(x[share]), y[share]).backward()             # DDP averages the halves' gradients
    m = monitor.end()
    if m is not None:
        out.append({"step": m.step, "examples": m.examples, "figures": m.figures, "scalars": m.scalars,
                    "loss": m.loss, "feature_var": m.feature_var})
    opt.step()
    opt.zero_grad()
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
if distributed:
    dist.barrier()                                                    # neither rank closes while the other talks
    dist.destroy_process_group()
'''


def test_two_ddp_processes_give_the_single_process_figures(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun([str(script), str(tmp_path / "two.json")], cwd=tmp_path, env=env)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [0, 2]
    for a, b in zip(two, one):
        assert a["examples"] == b["examples"] == 12
        for name in b["figures"]:
            assert_figures_close(a["figures"][name], b["figures"][name], rel=1e-5)
        assert_figures_close(a["scalars"], b["scalars"], rel=1e-5)
        assert abs(a["loss"] - b["loss"]) <= 1e-9 and abs(a["feature_var"] - b["feature_var"]) <= 1e-9
