"""Peak memory of the probe pass: it must not grow with the dataset (SPEC §7).

    python benchmarks/memory.py [--arch resnet18|vggish|vit|bert] [--small 1024] [--large 8192] [--threads 2]
    python benchmarks/memory.py --resnet50-224 [--batches 2]

Accumulators are O(parameters + channels), never O(dataset) (SPEC §7). The
default mode runs the full probe pass — noise, change_rate (exact), grad_norm,
and r2 / drift against a reference copy of the model — over ``--small`` and
``--large`` examples of fake-like data (3×32×32 uniform noise, 10 classes,
batch 64) in two fresh subprocesses and prints the peak resident set size of
each and their ratio. Target: the two peaks within 10% of each other.

The images are generated lazily per index (seeded by the index), so the data
itself holds no memory proportional to N. Each child reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before the pass (after imports, model and reference
are built and one warm-up batch has run) and after it.

``--resnet50-224`` probes torchvision resnet50 at 224×224, batch 32, over
``--batches`` batches (all five probes, reference included) and prints peak
RSS (target ≤ 8 GB) and wall time.
"""
from __future__ import annotations

import os

from _machine import Bundle, header  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from ftdoctor.diagnose import ProbeOptions, probe_model

GB = 1024 ** 3
OPTIONS = ProbeOptions(change_rate_mode="exact")   # all probes apply once a reference is given


class LazyFake(Dataset):
    """Uniform-noise images generated on demand: item ``i`` is (x_i, y_i, i), seeded by ``i``."""

    def __init__(self, count: int, size: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        self.count, self.size, self.num_classes, self.seed = count, size, num_classes, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.rand(3, self.size, self.size, generator=g)
        y = int(torch.randint(0, self.num_classes, (), generator=g))
        return x, y, int(i)


class LazyText(Dataset):
    """Token sequences generated on demand for a BERT-style model: item ``i`` is ({input_ids,
    attention_mask}, y_i, i), 32 tokens with 8–32 of them real, seeded by ``i``."""

    def __init__(self, count: int, length: int = 32, vocab: int = 4000, num_classes: int = 4) -> None:
        self.count, self.length, self.vocab, self.num_classes = count, length, vocab, num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        g = torch.Generator().manual_seed(int(i))
        real = int(torch.randint(8, self.length + 1, (), generator=g))
        mask = (torch.arange(self.length) < real).long()
        ids = torch.randint(1, self.vocab, (self.length,), generator=g) * mask
        return {"input_ids": ids, "attention_mask": mask}, int(torch.randint(0, self.num_classes, (), generator=g)), i


def data(arch: str, count: int, size: int) -> Dataset:
    return LazyText(count) if arch == "bert" else LazyFake(count, size)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux, macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build(arch: str) -> nn.Module:
    import torchvision.models as tvm
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if arch in ("vit", "bert"):                 # the small transformers of benchmarks/_models.py
        import _models
        return (_models.vit if arch == "vit" else _models.bert)(1)[1]
    if arch == "vggish":
        from _models import VGGish
        return VGGish(num_classes=10)
    return getattr(tvm, arch)(num_classes=10)


def child(arch: str, count: int, size: int, batch_size: int, threads: int) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(arch).eval()
    reference = copy.deepcopy(model)
    classes = 4 if arch == "bert" else 10
    warm = Bundle(data(arch, min(batch_size, count), size), classes, batch_size, "lazy")
    probe_model(model, warm, OPTIONS, reference=reference)   # one batch: kernels, allocator, thread pool
    before = peak_rss_bytes()
    bundle = Bundle(data(arch, count, size), classes, batch_size, "lazy")
    t0 = time.perf_counter()
    run = probe_model(model, bundle, OPTIONS, reference=reference)
    seconds = time.perf_counter() - t0
    print(json.dumps({"count": count, "before": before, "peak": peak_rss_bytes(), "seconds": seconds,
                      "probes": list(run.results), "num_samples": run.num_samples}))


def spawn(args: argparse.Namespace, count: int, size: int, batch_size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(count), "--arch", args.arch,
           "--size", str(size), "--batch-size", str(batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2 ** 20:7.0f} MB"


def scaling(args: argparse.Namespace) -> None:
    print(header(args.threads))
    what = "32 tokens" if args.arch == "bert" else "32x32"
    print(f"{args.arch} at {what}, batch 64, probes: noise, change_rate (exact), grad_norm, r2, drift "
          f"(reference = a copy); each size in a fresh subprocess")
    rows = {}
    for count in (args.small, args.large):
        r = spawn(args, count, 32, 64)
        rows[count] = r
        print(f"  N = {count:5d}: peak RSS {mb(r['peak'])}  (before the pass {mb(r['before'])}, "
              f"growth {mb(r['peak'] - r['before'])})  pass {r['seconds']:6.1f} s  probes {','.join(r['probes'])}")
    small, large = rows[args.small], rows[args.large]
    ratio = large["peak"] / small["peak"]
    verdict = "ok" if abs(ratio - 1) <= 0.10 else "ABOVE the 10% target"
    print(f"  peak RSS ratio N={args.large} / N={args.small}: {ratio:.3f}  ({verdict}); "
          f"growth during the pass {mb(small['peak'] - small['before']).strip()} vs "
          f"{mb(large['peak'] - large['before']).strip()}")


def resnet50_224(args: argparse.Namespace) -> None:
    print(header(args.threads))
    count = 32 * args.batches
    print(f"resnet50 at 224x224, batch 32, {args.batches} batches ({count} examples), all five probes "
          f"(reference = a copy), fresh subprocess")
    args.arch = "resnet50"
    t0 = time.perf_counter()
    r = spawn(args, count, 224, 32)
    total = time.perf_counter() - t0
    verdict = "ok" if r["peak"] <= 8 * GB else "ABOVE the 8 GB target"
    print(f"  peak RSS {r['peak'] / GB:.2f} GB ({verdict}; {r['before'] / GB:.2f} GB before the pass, "
          f"after one warm-up batch)")
    print(f"  probe pass {r['seconds']:.1f} s ({r['seconds'] / args.batches:.1f} s/batch); "
          f"child process total {total:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18", help="torchvision model name, vggish, vit (timm ViT-tiny) or "
                    "bert (Hugging Face BERT-mini)")
    ap.add_argument("--small", type=int, default=1024)
    ap.add_argument("--large", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--resnet50-224", action="store_true", help="resnet50 at 224x224, batch 32")
    ap.add_argument("--batches", type=int, default=2, help="batches for --resnet50-224")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.arch, args.child, args.size, args.batch_size, args.threads)
    elif args.resnet50_224:
        resnet50_224(args)
    else:
        scaling(args)


if __name__ == "__main__":
    main()
