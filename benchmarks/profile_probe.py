"""Where the probe pass spends its time, phase by phase, measured with torch's profiler.

    python benchmarks/profile_probe.py [--model resnet18|vgg|vit|vit65|bert] [--batches 4] [--threads 2] [--device cpu]

The engine labels its phases (``torch.profiler.record_function``; free when no profiler runs):
``ftdoctor.forward``, ``ftdoctor.backward_random`` (the random-loss backward, with the per-example squares
inside it), ``ftdoctor.backward_ce``, ``ftdoctor.per_example_squares``, ``ftdoctor.reference_forward`` and
``ftdoctor.update.<Probe>`` (each probe folding a batch into its float64 sums). For the exact pass without
and with a reference (``batch`` mode too), this prints each phase's time per batch next to a plain training
step's forward and backward, also profiled, so that the gap between the pass and the training step is
accounted for phase by phase. Times are the profiler's CPU totals of each labelled range on the thread
that ran it (a range on the overlap thread counts on its own). The profiler's own cost inflates ranges of
many small operations (the per-example squares by about a fifth), so each run is timed a second time
without it: each range's wall time, taken by a stand-in for ``record_function``, is the second column.
"""
from __future__ import annotations

from _machine import start, tensor_bundle  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import overhead
from _models import VGGish
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.forward import logits, to_device


def build(name: str, batches: int):
    if name in overhead.TRANSFORMERS:
        return overhead.transformer(overhead.TRANSFORMERS[name], batches)
    torch.manual_seed(0)
    from torchvision.models import resnet18
    model = resnet18(num_classes=10) if name == "resnet18" else VGGish()
    return model, tensor_bundle(torch.randn(64 * batches, 3, 32, 32), torch.randint(0, 10, (64 * batches,)), 10, 64)


def train(model, bundle, device) -> None:
    model.train()
    for x, y, _ in bundle.loader():
        with record_function("train.forward"):
            loss = F.cross_entropy(logits(model, to_device(x, device)), y.to(device))
        model.zero_grad(set_to_none=True)
        with record_function("train.backward"):
            loss.backward()
    model.eval()


def profiled(fn) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``fn()`` under the profiler, and the CPU seconds of each labelled range."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    spans: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith(("ftdoctor.", "train.")):
            spans[event.name] = spans.get(event.name, 0.0) + event.cpu_time_total / 1e6
    return wall, spans


class _Clock:
    """``record_function``'s stand-in: the wall time of each labelled range, without a profiler."""

    spans: dict[str, float] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        _Clock.spans[self.name] = _Clock.spans.get(self.name, 0.0) + time.perf_counter() - self.t0


def clocked(fn) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``fn()`` and of each labelled range, no profiler running."""
    global record_function
    real = torch.profiler.record_function
    torch.profiler.record_function = record_function = _Clock     # the engine looks it up at each call
    _Clock.spans = {}
    try:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    finally:
        torch.profiler.record_function = record_function = real
    return wall, dict(_Clock.spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = start(parser)
    device = torch.device(args.device)
    model, bundle = build(args.model, args.batches)
    model = model.to(device)
    ref = copy.deepcopy(model)
    n = args.batches
    runs = {"train step": lambda: train(model, bundle, device),
            "exact": lambda: probe_model(model, bundle, ProbeOptions(), device=device),
            "batch": lambda: probe_model(model, bundle, ProbeOptions(change_rate_mode="batch"), device=device),
            "exact + reference": lambda: probe_model(model, bundle, ProbeOptions(), reference=ref, device=device)}
    for fn in runs.values():                         # warm-up
        fn()
    walls: dict[str, tuple[float, float]] = {}
    print(f"{args.model}, batch 64, {n} batches, device {device}; ms per batch: under the profiler (wall, then "
          f"each labelled phase's CPU time) | without it (wall)")
    for name, fn in runs.items():
        wall, spans = profiled(fn)
        bare, clock = clocked(fn)
        walls[name] = wall, bare
        ratio = (f" = {wall / walls['train step'][0]:.2f}x | {bare / walls['train step'][1]:.2f}x the train step"
                 if name != "train step" else "")
        print(f"\n{name}: {1000 * wall / n:.1f} | {1000 * bare / n:.1f} ms/batch{ratio}")
        labelled = [0.0, 0.0]
        for label, seconds in sorted(spans.items(), key=lambda kv: -kv[1]):
            nested = label == "ftdoctor.per_example_squares"      # runs inside backward_random / backward_ce
            if not nested:
                labelled[0] += seconds
                labelled[1] += clock.get(label, 0.0)
            print(f"  {label:<40} {1000 * seconds / n:8.1f} | {1000 * clock.get(label, 0.0) / n:6.1f} ms/batch"
                  f"{'  (inside the backward)' if nested else ''}")
        print(f"  {'rest (setup, data, bookkeeping)':<40} {1000 * max(0.0, wall - labelled[0]) / n:8.1f} | "
              f"{1000 * max(0.0, bare - labelled[1]) / n:6.1f} ms/batch")


if __name__ == "__main__":
    main()
