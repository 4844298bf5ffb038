"""Cost of recognising a torchvision architecture from a bare state dict (no ``--arch``).

    python benchmarks/recognition.py [--archs resnet18,resnet50,mobilenet_v3_small,vit_b_16] [--repeats 3]

For each architecture, saves a random-weight state dict and prints the median time of
``load_model(path, ModelOptions())`` (recognition: candidates matched by their key and shape
signature before one is built) and of ``load_model(path, ModelOptions(arch=NAME))`` (the same file
named), and their ratio. Target: recognition within 2x of the named load, and well under a minute.
"""
from __future__ import annotations

from _machine import start  # before torch: the allocator settings

import argparse  # noqa: E402
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ftdoctor.checkpoint import ModelOptions, load_model


def seconds(path: Path, options: ModelOptions) -> float:
    start = time.perf_counter()
    loaded = load_model(path, options)
    took = time.perf_counter() - start
    assert loaded.arch == path.stem, (loaded.arch, path.stem)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v3_small,vit_b_16")
    ap.add_argument("--repeats", type=int, default=3)
    args = start(ap)
    import torchvision.models

    print(f"median of {args.repeats} interleaved repeats; ratio = recognised / named")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            path = Path(tmp) / f"{arch}.pt"
            torch.save(torchvision.models.get_model(arch, num_classes=10).state_dict(), path)
            named, recognised = [], []
            for _ in range(args.repeats):
                named.append(seconds(path, ModelOptions(arch=arch)))
                recognised.append(seconds(path, ModelOptions()))
            n, r = statistics.median(named), statistics.median(recognised)
            print(f"{arch:20s} named {n:6.2f} s   recognised {r:6.2f} s   ratio {r / n:.2f}x "
                  f"({'ok' if r / n <= 2 else 'OVER'})")


if __name__ == "__main__":
    main()
