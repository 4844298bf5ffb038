"""What ``--dtype bfloat16`` / ``float16`` changes in each figure, against float32, and what it costs.

    python benchmarks/precision.py [--batches 4] [--threads 2] [--device cpu] [--dtypes bfloat16,float16]

The model's forward and backward run under ``torch.autocast``; the losses are formed from float32 logits and
every accumulator stays float64. For resnet18 (32×32), the small timm ViT and the small Hugging Face BERT of
``benchmarks/_models.py``, all five probes (the reference is a perturbed copy, so that R² and drift are not
trivially 1 and 0) run once in float32 and once per reduced dtype on the same batches; per figure the
median and the largest relative difference over its values (a per-layer figure has one per layer) are
printed, with the pass's time against float32's.
"""
from __future__ import annotations

from _machine import inputs_bundle, start  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import statistics
import time
from collections import defaultdict

import torch

import _models
from ftdoctor.diagnose import ProbeOptions, probe_model


def figures(doc: dict) -> dict[str, list[float]]:
    """Every float of the probes' figures, keyed ``probe.key`` (per-layer ones ``probe.layers[].key``)."""
    out: dict[str, list[float]] = defaultdict(list)
    for probe, figs in doc.items():
        for key, value in figs.items():
            if isinstance(value, float):
                out[f"{probe}.{key}"].append(value)
            elif key == "layers":
                for row in value:
                    for k, v in row.items():
                        if isinstance(v, float):
                            out[f"{probe}.layers[].{k}"].append(v)
    return out


def run(model, bundle, reference, dtype: str, device: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    result = probe_model(model, bundle, ProbeOptions(dtype=dtype), reference=reference, device=device)
    seconds = time.perf_counter() - t0
    return {n: r.figures.to_json() for n, r in result.results.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    args = start(parser)
    makers = [_models.cnn(_models.resnet18, "torchvision resnet18 (32x32)"), _models.vit, _models.bert]
    for make in makers:
        name, model, inputs, y, classes, _ = make(64 * args.batches)
        model = model.to(args.device)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * p.std().nan_to_num() * torch.randn_like(p))
        bundle = inputs_bundle(inputs, y, classes, 64)
        base, t32 = run(model, bundle, reference, "float32", args.device)
        want = figures(base)
        print(f"\n{name}: float32 pass {t32:.1f} s", flush=True)
        for dtype in args.dtypes.split(","):
            got, t = run(model, bundle, reference, dtype, args.device)
            have = figures(got)
            print(f"  {dtype}: pass {t:.1f} s ({t / t32:.2f}x float32); relative difference to float32, "
                  f"median / largest over the figure's values:")
            for key, ref_vals in want.items():
                vals = have.get(key, [])
                rel = [abs(a - b) / abs(b) for a, b in zip(vals, ref_vals) if b]
                if rel:
                    print(f"    {key:<40} {statistics.median(rel):8.1e} / {max(rel):8.1e}   ({len(rel)} values)")


if __name__ == "__main__":
    main()
