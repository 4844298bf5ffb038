"""Cost of the probe pass relative to a plain training step over the same batches (SPEC §7).

    python benchmarks/overhead.py [--repeats 5] [--batches 8] [--threads 2]

For torchvision resnet18 at 32×32 (batch 64) and a VGG-style CNN without
BatchNorm, prints the median time of

* a plain training step: forward + backward (+ nothing else) per batch,
* the full probe pass with the default probes (noise, change_rate, grad_norm —
  all that apply without ``--reference``), ``--change-rate-mode exact`` and ``batch``,
* the same in exact mode with a reference model too (adds r2 and drift, and one
  more forward pass of the reference per batch),

and their ratios. Repeats are interleaved (baseline, exact, batch, baseline, ...)
so drift in machine load hits all of them alike. Targets: exact ≤ 2.5×,
batch ≤ 1.9×; the floor is about 1.67× (one forward and two backward passes
against one forward and one backward).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftdoctor.diagnose import ProbeOptions, probe_model


class VGGish(nn.Module):
    """VGG-style: six 3×3 convs with ReLU and max-pooling, no BatchNorm, two Linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        chans = [3, 32, 32, 64, 64, 128, 128]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Bundle:
    """An in-memory DataBundle: (x, y, index) batches in a fixed order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int) -> None:
        self.x, self.y, self.num_classes, self.batch_size = x, y, num_classes, batch_size
        self.num_samples, self.name, self.split, self.notes = len(y), "bench", "train", []

    @property
    def dataset(self) -> TensorDataset:
        return TensorDataset(self.x, self.y, torch.arange(len(self.y)))

    def loader(self, batch_size=None, shuffle=False, seed=0, sampler=None, drop_last=False):
        return DataLoader(self.dataset, batch_size=batch_size or self.batch_size)


def train_steps(model: nn.Module, bundle: Bundle) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, y, _ in bundle.loader():
        loss = F.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
    return time.perf_counter() - t0


def probe_pass(model: nn.Module, ref: nn.Module | None, bundle: Bundle, mode: str) -> float:
    t0 = time.perf_counter()
    probe_model(model, bundle, ProbeOptions(change_rate_mode=mode), reference=ref, batch_size=bundle.batch_size)
    return time.perf_counter() - t0


def bench(name: str, model: nn.Module, batches: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    bundle = Bundle(torch.randn(64 * batches, 3, 32, 32), torch.randint(0, 10, (64 * batches,)), 10, 64)
    ref = copy.deepcopy(model)
    train_steps(model, bundle)                     # warm-up: allocator, kernels, thread pool
    probe_pass(model, None, bundle, "exact")
    times: dict[str, list[float]] = {"train": [], "exact": [], "batch": [], "exact+ref": []}
    for _ in range(repeats):
        times["train"].append(train_steps(model, bundle))
        times["exact"].append(probe_pass(model, None, bundle, "exact"))
        times["batch"].append(probe_pass(model, None, bundle, "batch"))
        times["exact+ref"].append(probe_pass(model, ref, bundle, "exact"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name:<20} train step {1000 * med['train'] / batches:7.1f} ms/batch   "
          f"exact {med['exact'] / med['train']:5.2f}x (target 2.5)   batch {med['batch'] / med['train']:5.2f}x "
          f"(target 1.9)   exact + r2/drift {med['exact+ref'] / med['train']:5.2f}x")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=16)   # 1024 examples, probe's default
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torchvision.models import resnet18
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"batch 64 at 32x32, {args.batches} batches, median of {args.repeats} interleaved repeats")
    print("ratios: probe pass / plain training step (forward + backward), same batches")
    bench("resnet18", resnet18(num_classes=10), args.batches, args.repeats)
    bench("VGG-style (no BN)", VGGish(), args.batches, args.repeats)


if __name__ == "__main__":
    main()
