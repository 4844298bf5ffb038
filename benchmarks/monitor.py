"""Cost of the live monitor: a monitored training run against the same run without it, on the same batches.

    python benchmarks/monitor.py [--steps 100] [--repeats 3] [--threads 2] [--batch 64] [--models resnet18,vit,bert,bert4]

Each model of ``benchmarks/_models.py`` trains for ``--steps`` SGD steps (momentum 0.9, train mode) over a fixed
cycle of batches, once plain and once with :class:`ftdoctor.monitor.Monitor` at its default schedule (steps
0, 1, 2, then every 50th: 4 of 100 steps measured) and its default probes with the reference kept at the
first forward (noise, change rates from the loop's own backward, gradient norms, R² with a reference forward,
drift). Repeats are interleaved (plain, monitored, plain, …). Prints, as medians over the repeats:

* **run** — the monitored run's wall time over the plain run's (target ≤ 1.03×);
* **measuring step** — a measured step's time (forward, backward, the monitor's end()) over the plain run's
  step at the same index, the median over the measured steps after step 0 (target ≤ 1.6×);
* **step 0** — the first measured step alone, which also finds the layers and copies the reference (once
  per run).

Between measuring steps the model carries no hook: those steps cost what plain steps cost.
"""
from __future__ import annotations

from _machine import busy_warning, header  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from _models import bert, bert4, cnn, resnet18, vit
from ftdoctor.monitor import Monitor, Schedule

MODELS = {"resnet18": cnn(resnet18, "torchvision resnet18 (32×32)"), "vit": vit, "bert": bert, "bert4": bert4}


def _slice(x, lo, hi):
    return {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]


def run(model, batches, steps, call, monitor: Monitor | None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        if monitor is not None:
            monitor.begin(step, labels=y)
        loss = F.cross_entropy(call(model, x), y)
        loss.backward()
        if monitor is not None:
            monitor.end()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if monitor is not None:
        monitor.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cycle", type=int, default=8, help="distinct batches the run cycles through")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    warning = busy_warning()
    if warning:
        print(warning)
    schedule = Schedule()
    measured = [s for s in range(args.steps) if s in schedule]
    print(f"{args.steps} steps, batch {args.batch}, default schedule: steps {measured} measured\n")
    print(f"{'model':<44} {'plain step':>10} {'run':>7} {'measuring step':>15} {'step 0':>7}")
    for key in args.models.split(","):
        name, model0, x, y, _, call = MODELS[key](args.batch * args.cycle)
        batches = [(_slice(x, i * args.batch, (i + 1) * args.batch), y[i * args.batch:(i + 1) * args.batch])
                   for i in range(args.cycle)]
        runs, steps_ratio, first = [], [], []
        plain_steps = []
        for _ in range(args.repeats):
            plain = run(copy.deepcopy(model0), batches, args.steps, call, None)
            model = copy.deepcopy(model0)
            watched = run(model, batches, args.steps, call, Monitor(model, warn=False))
            runs.append(sum(watched) / sum(plain))
            steps_ratio.append(statistics.median(watched[s] / plain[s] for s in measured[1:]))
            first.append(watched[0] / statistics.median(plain))
            plain_steps.append(statistics.median(plain))
        print(f"{name:<44} {statistics.median(plain_steps) * 1e3:>8.1f}ms {statistics.median(runs):>6.3f}× "
              f"{statistics.median(steps_ratio):>14.2f}× {statistics.median(first):>6.2f}×", flush=True)


if __name__ == "__main__":
    main()
