"""What the benchmarks share: OpenMP's wait policy set before torch loads, the CLI's allocator
settings, and a one-line machine header.

Import this module before ``torch``. With OpenMP's default (spinning) wait policy, a thread that
waits for a descheduled peer burns its core: whenever anything else ran on this two-core machine a
2-thread pass ran 20-30x slower (SmallCNN: 1305 vs 41 ms/batch at load 3), which measures the
machine, not the code. ``OMP_WAIT_POLICY=PASSIVE`` (overridable from the environment) avoids that.
"""
from __future__ import annotations

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
