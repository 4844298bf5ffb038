"""Cost of the live monitor: a monitored training run against the same run without it, on the same batches.

    python benchmarks/monitor.py [--steps 100] [--repeats 3] [--threads 2] [--batch 64] [--models resnet18,vit,bert]

Each model of ``benchmarks/_models.py`` trains for ``--steps`` SGD steps (momentum 0.9, train mode) over a fixed
cycle of batches, three times from the same weights: plain; with :class:`ftdoctor.monitor.Monitor` at its
default schedule (steps 0, 1, 2, then every 50th: 4 of 100 steps measured) and its default probes with the
reference kept at the first forward (noise, change rates from the loop's own backward, gradient norms, R²
with a reference forward, drift); and with a monitor measuring every other step. The three runs advance
together, one step each in rotating order (:func:`lockstep`), so a shared machine's changing speed reaches
them alike. Prints, as medians over ``--repeats``:

* **run** — the monitored run's wall time over the plain run's, the monitor's construction included
  (target ≤ 1.03×);
* **measuring step** — a measured step's time (forward, backward, the monitor's end()) over the plain
  run's same step, run just before or after it: the median over the every-other-step run's ~50 measured
  steps after step 0 (target ≤ 1.6×);
* **step 0** — the first measured step, which also finds the layers and copies the reference, with the
  monitor's construction, over the plain run's first step.

Between measuring steps the model carries no hook: those steps cost what plain steps cost.
"""
from __future__ import annotations

from _machine import CostTable, busy_warning, header  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from _models import bert, bert4, cnn, resnet18, vit
from ftdoctor.monitor import Monitor, Schedule

MODELS = {"resnet18": cnn(resnet18, "torchvision resnet18 (32×32)"), "vit": vit, "bert": bert, "bert4": bert4}


def _slice(x, lo, hi):
    return {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]


@dataclass
class _Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    monitor: Monitor | None
    times: list[float] = field(default_factory=list)


def lockstep(model0, batches, steps, call, schedules: list[Schedule | None]) -> list[list[float]]:
    """Each step's wall time in one run per schedule (None: plain, no monitor), every run from its own copy
    of ``model0``, the runs advanced together one step at a time in rotating order: a shared machine's
    changing speed reaches every run alike (between separate runs it moved the plain run's time by ±5 %).
    A monitor's construction counts in its run's step 0 (it is part of what monitoring costs)."""
    runs = []
    for schedule in schedules:
        model = copy.deepcopy(model0).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        t0 = time.perf_counter()
        monitor = Monitor(model, warn=False, schedule=schedule) if schedule is not None else None
        runs.append(_Run(model, opt, monitor, [time.perf_counter() - t0]))
    for step in range(steps):
        x, y = batches[step % len(batches)]
        for k in range(len(runs)):
            r = runs[(step + k) % len(runs)]
            t0 = time.perf_counter()
            if r.monitor is not None:
                r.monitor.begin(step, labels=y)
            loss = F.cross_entropy(call(r.model, x), y)
            loss.backward()
            if r.monitor is not None:
                r.monitor.end()
            r.opt.step()
            r.opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            if step == 0:
                r.times[0] += elapsed
            else:
                r.times.append(elapsed)
    for r in runs:
        if r.monitor is not None:
            r.monitor.close()
    return [r.times for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cycle", type=int, default=8, help="distinct batches the run cycles through")
    ap.add_argument("--models", default="resnet18,vit,bert",
                    help="comma-separated: resnet18, vit, bert, bert4 (4 layers on 128 tokens, over a second a step: try --steps 60 --repeats 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    warning = busy_warning()
    if warning:
        print(warning)
    schedule = Schedule()
    measured = [s for s in range(args.steps) if s in schedule]
    print(f"{args.steps} steps, batch {args.batch}, default schedule: steps {measured} measured\n")
    print(CostTable.HEADER)
    for key in args.models.split(","):
        name, model0, x, y, _, call = MODELS[key](args.batch * args.cycle)
        batches = [(_slice(x, i * args.batch, (i + 1) * args.batch), y[i * args.batch:(i + 1) * args.batch])
                   for i in range(args.cycle)]
        table = CostTable()
        for _ in range(args.repeats):
            plain, watched, dense = lockstep(model0, batches, args.steps, call,
                                             [None, schedule, Schedule(every=2, first=0)])
            table.add(plain, watched, [dense[s] / plain[s] for s in range(2, args.steps, 2)])
        print(table.row(name), flush=True)

if __name__ == "__main__":
    main()
