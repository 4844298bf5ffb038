"""What the benchmarks share: OpenMP's wait policy set before torch loads, the CLI's allocator
settings, a one-line machine header, and the in-memory data bundle they feed to ``probe_model``.

Import this module before ``torch``. With OpenMP's default (spinning) wait policy, a thread that
waits for a descheduled peer burns its core: whenever anything else ran on this two-core machine a
2-thread pass ran 20-30x slower (SmallCNN: 1305 vs 41 ms/batch at load 3), which measures the
machine, not the code. ``OMP_WAIT_POLICY=PASSIVE`` (overridable from the environment) avoids that.
"""
from __future__ import annotations

import argparse

import os
import platform

from ftdoctor.allocator import keep_freed_memory

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    return (f"torch {torch.__version__}, threads={threads} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
            f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load}")


class Bundle:
    """A DataBundle over any (x, y, index) dataset: batches in a fixed order, as ``probe_model`` reads them."""

    def __init__(self, dataset, num_classes: int, batch_size: int, name: str = "bench") -> None:
        self.dataset, self.num_classes, self.batch_size = dataset, num_classes, batch_size
        self.num_samples, self.name, self.split, self.notes = len(dataset), name, "train", []

    def loader(self, batch_size=None, shuffle=False, seed=0, sampler=None, drop_last=False):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_size=batch_size or self.batch_size)


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
    return args
