"""Cost of the probe pass relative to a plain training step over the same batches (SPEC §7).

    python benchmarks/overhead.py [--repeats 5] [--batches 16] [--threads 2] [--models resnet18,vgg,vit,vit65,bert]
                                  [--device cpu] [--batch 64] [--image-size 32]

For torchvision resnet18 at 32×32 (batch 64), a VGG-style CNN without
BatchNorm, a small timm ViT (4 blocks, 32×32) in 8×8 patches (17 tokens an
example) and in 4×4 patches (``vit65``: 65 tokens), and a small Hugging Face BERT
(2 layers, 32 tokens with padding) — the models of ``benchmarks/_models.py`` —
prints the median time of

* a plain training step: forward + backward (+ nothing else) per batch,
* the floor: an eval-mode forward and the two backward passes every probe pass
  needs, asking autograd for all weight gradients and nothing more (about
  1.67× in theory: one forward and two backward passes against one of each),
* the full probe pass with the default probes (noise, change_rate, grad_norm —
  all that apply without ``--reference``), ``--change-rate-mode batch`` and
  ``exact``,
* the floor and the exact probe pass with a reference model too (adds r2 and
  drift, and the reference's forward pass per batch),

and their ratios to the training step. Repeats are interleaved (train, floor,
batch, exact, ..., train, floor, ...) so drift in machine load hits all of them
alike. Targets: with a reference exact ≤ 2.0×; without, exact ≤ 1.8× and batch ≤ 1.6× on the CNNs,
exact ≤ 2.5× on the transformers.
"""
from __future__ import annotations

from _machine import busy_warning, header, inputs_bundle, tensor_bundle  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


from _models import VGGish, bert, vit, vit65
from ftdoctor.diagnose import ProbeOptions, probe_model

from ftdoctor.forward import logits, to_device as to

DEVICE = torch.device("cpu")


def train_steps(model: nn.Module, bundle) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, y, _ in bundle.loader():
        loss = F.cross_entropy(logits(model, to(x, DEVICE)), y.to(DEVICE))
        model.zero_grad(set_to_none=True)
        loss.backward()
    return time.perf_counter() - t0


def floor_steps(model: nn.Module, bundle, ref: nn.Module | None = None) -> float:
    """The physics the probe pass cannot avoid: an eval-mode forward and the two backward passes
    (random η loss, mean cross-entropy) asking for every weight gradient — no hooks, no per-example
    work, no bookkeeping — plus the reference's forward when ``ref`` is given."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for x, y, _ in bundle.loader():
        x, y = to(x, DEVICE), y.to(DEVICE)
        out = logits(model, x)
        eta = torch.randn_like(out)
        torch.autograd.grad((eta * out).sum(), params, retain_graph=True)
        torch.autograd.grad(F.cross_entropy(out, y), params)
        if ref is not None:
            with torch.no_grad():
                logits(ref, x)
    elapsed = time.perf_counter() - t0
    model.train()
    return elapsed


def probe_pass(model: nn.Module, ref: nn.Module | None, bundle, mode: str) -> float:
    t0 = time.perf_counter()
    probe_model(model, bundle, ProbeOptions(change_rate_mode=mode), reference=ref, batch_size=bundle.batch_size,
                device=DEVICE)
    return time.perf_counter() - t0


RUNS = {
    "train": lambda m, r, b: train_steps(m, b),
    "floor": lambda m, r, b: floor_steps(m, b),
    "batch": lambda m, r, b: probe_pass(m, None, b, "batch"),
    "exact": lambda m, r, b: probe_pass(m, None, b, "exact"),
    "floor+ref": lambda m, r, b: floor_steps(m, b, r),
    "exact+ref": lambda m, r, b: probe_pass(m, r, b, "exact"),
}


def bench(name: str, model: nn.Module, bundle, repeats: int, transformer: bool = False) -> dict[str, float]:
    batches = bundle.num_samples // bundle.batch_size
    model = model.to(DEVICE)
    ref = copy.deepcopy(model)
    for run in RUNS.values():                      # warm-up: allocator, kernels, thread pool
        run(model, ref, bundle)
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    for _ in range(repeats):
        for key, run in RUNS.items():
            times[key].append(run(model, ref, bundle))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["train"] for k in RUNS}
    def against(key: str, target: float) -> str:
        return f"{ratio[key]:.2f}x (target {target:g}: {'ok' if ratio[key] <= target else 'OVER'})"
    batch_t, exact_t, ref_t = (2.5, 2.5, 2.5) if transformer else (1.6, 1.8, 2.0)
    print(f"{name}: train step {1000 * med['train'] / batches:.1f} ms/batch")
    print(f"  without a reference (noise, change_rate, grad_norm)   floor {ratio['floor']:.2f}x   "
          f"batch {against('batch', batch_t)}   exact {against('exact', exact_t)}")
    print(f"  with --reference (+ r2, drift)                        floor {ratio['floor+ref']:.2f}x   "
          f"exact {against('exact+ref', ref_t)}")
    return med


def image_bundle(batches: int, size: int = 32, batch: int = 64):
    torch.manual_seed(0)
    return tensor_bundle(torch.randn(batch * batches, 3, size, size), torch.randint(0, 10, (batch * batches,)), 10,
                         batch)


def transformer(make, batches: int, batch: int = 64):
    """The model and a bundle of ``batch``-example batches from a ``benchmarks/_models.py`` builder."""
    _, model, inputs, y, classes, _ = make(batch * batches)
    return model, inputs_bundle(inputs, y, classes, batch)


TRANSFORMERS = {"vit": vit, "vit65": vit65, "bert": bert}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=16)   # 1024 examples, probe's default
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet18,vgg,vit,vit65,bert",
                    help="comma-separated: resnet18, vgg, vit (17 tokens), vit65 (65 tokens), bert")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    ap.add_argument("--batch", type=int, default=64, help="examples per batch")
    ap.add_argument("--image-size", type=int, default=32, help="resnet18's input size (the others are built for 32)")
    args = ap.parse_args()
    keys = args.models.split(",")
    unknown = sorted(set(keys) - {"resnet18", "vgg", *TRANSFORMERS})
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}")
    if args.image_size != 32 and set(keys) != {"resnet18"}:
        ap.error("--image-size is for resnet18 alone (--models resnet18)")
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    from torchvision.models import resnet18
    print(header(args.threads) + f", device {DEVICE}")
    warning = busy_warning()
    if warning:
        print(warning)
    print(f"batch {args.batch} ({args.batches} batches), median of {args.repeats} interleaved repeats; "
          f"ratios to a plain training step (forward + backward) over the same batches")
    size = args.image_size
    for key in keys:
        if key == "resnet18":
            bench(f"resnet18 ({size}x{size})", resnet18(num_classes=10), image_bundle(args.batches, size, args.batch),
                  args.repeats)
        elif key == "vgg":
            bench("VGG-style (no BN, 32x32)", VGGish(), image_bundle(args.batches, batch=args.batch), args.repeats)
        else:
            make = TRANSFORMERS[key]
            model, bundle = transformer(make, args.batches, args.batch)
            bench(make(1)[0], model, bundle, args.repeats, transformer=True)


if __name__ == "__main__":
    main()
