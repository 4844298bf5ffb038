"""What the benchmarks share: the CLI's allocator settings, a one-line machine header, and the in-memory
data bundle they feed to ``probe_model``.

OpenMP's wait policy is the one ``ftdoctor`` runs with: the environment's, else OpenMP's default (threads
spin a while before they sleep). On this two-core VM the default is the faster one on an idle machine
(resnet18 at 32×32: a training step 111 ms a batch against 151 ms with ``OMP_WAIT_POLICY=PASSIVE``, the
exact probe pass 237 against 327 ms), but a spinning thread that waits for a descheduled peer burns its
core: with anything else running, a 2-thread pass ran 20-30× slower (SmallCNN: 1305 vs 41 ms/batch at
load 3). So the header prints the policy and the load average, and :func:`busy_warning` warns when the
load is high; on a busy machine run with ``OMP_WAIT_POLICY=PASSIVE`` (as ``ftdoctor`` itself should be
there).
"""
from __future__ import annotations

import argparse

import os
import platform

from ftdoctor.allocator import keep_freed_memory

# As the ftdoctor command does at start (ftdoctor/allocator.py): freed large blocks stay in the
# process. Both sides of every comparison run in this process, so both get it.
keep_freed_memory()


def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(threads: int) -> str:
    """torch version, threads, wait policy, CPU, core count and load: what a figure was measured on."""
    import torch

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    policy = os.environ.get("OMP_WAIT_POLICY") or "OpenMP's default"
    return (f"torch {torch.__version__}, threads={threads} (OMP_WAIT_POLICY={policy}), "
            f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load}")


def busy_warning() -> str | None:
    """A warning when the machine looks busy (1-minute load above half its cores) and OpenMP's threads spin."""
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if load <= cores / 2 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return None
    return (f"warning: load average {load:.2f} on {cores} CPUs: if another process is running, "
            "spinning OpenMP threads measure it, not the code; wait until it ends or run with "
            "OMP_WAIT_POLICY=PASSIVE")


class Bundle:
    """A DataBundle over any (x, y, index) dataset: batches in a fixed order, as ``probe_model`` reads them."""

    def __init__(self, dataset, num_classes: int, batch_size: int, name: str = "bench") -> None:
        self.dataset, self.num_classes, self.batch_size = dataset, num_classes, batch_size
        self.num_samples, self.name, self.split, self.notes = len(dataset), name, "train", []

    def loader(self, batch_size=None, shuffle=False, seed=0, sampler=None, drop_last=False):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_size=batch_size or self.batch_size)


class Items:
    """A dataset of (inputs, label, index) over batched inputs: an image tensor or a dict of token tensors."""

    def __init__(self, inputs, y) -> None:
        self.inputs, self.y = inputs, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, int(self.y[i]), i


def inputs_bundle(inputs, y, num_classes: int, batch_size: int) -> Bundle:
    """A :class:`Bundle` over the batched ``inputs`` of a ``benchmarks/_models.py`` model (tensor or dict)."""
    return Bundle(Items(inputs, y), num_classes, batch_size)


def batches_of(inputs, y, batch: int):
    """``(inputs, labels)`` slices of ``batch`` examples, in order."""
    for lo in range(0, len(y), batch):
        x = {k: v[lo:lo + batch] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[lo:lo + batch]
        yield x, y[lo:lo + batch]


def tensor_bundle(x, y, num_classes: int, batch_size: int) -> Bundle:
    """A :class:`Bundle` over in-memory tensors (index = position)."""
    import torch
    from torch.utils.data import TensorDataset

    return Bundle(TensorDataset(x, y, torch.arange(len(y))), num_classes, batch_size)


def start(parser: "argparse.ArgumentParser") -> "argparse.Namespace":
    """Every benchmark's start: add ``--threads``, parse, set torch's threads, print the machine header."""
    import torch

    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    warning = busy_warning()
    if warning:
        print(warning)
    return args


class CostTable:
    """The monitor benchmarks' table: per repeat a plain run's and a monitored run's step times and the
    measuring steps' ratios; a row prints their medians over the repeats. Step 0 is the monitored run's
    first step over the plain run's first step: each includes its run's set-up and its first forward's
    allocations, so the ratio shows what the monitor adds to them."""

    HEADER = f"{'model':<44} {'plain step':>10} {'run':>7} {'measuring step':>15} {'step 0':>7}"

    def __init__(self) -> None:
        self.runs: list[float] = []
        self.steps: list[float] = []
        self.first: list[float] = []
        self.plain: list[float] = []

    def add(self, plain: list[float], watched: list[float], step_ratios) -> None:
        """One repeat: both runs' step times, and the measuring steps' ratios to plain steps."""
        import statistics
        self.runs.append(sum(watched) / sum(plain))
        self.steps.append(statistics.median(step_ratios))
        self.first.append(watched[0] / plain[0])     # both cold: a first step's own costs are in either
        self.plain.append(statistics.median(plain))

    def row(self, name: str) -> str:
        from statistics import median
        return (f"{name:<44} {median(self.plain) * 1e3:>8.1f}ms {median(self.runs):>6.3f}× "
                f"{median(self.steps):>14.2f}× {median(self.first):>6.2f}×")
