"""ftdoctor's per-example gradient squares against BackPACK's ``SumGradSquared`` (SPEC §1.2, §7).

    python benchmarks/backpack_compare.py [--repeats 5] [--batches 8] [--threads 2]
    pip install -r benchmarks/requirements.txt      # BackPACK, for the side-by-side rows

With ``--change-rate-loss ce`` the ``change_rate`` probe's ``G²_k`` is, per the
SPEC, BackPACK's ``SumGradSquared`` of the per-example cross-entropy
(``reduction="sum"``) divided by the number of examples. For the same model and
the same batches (batch 64 at 32×32) this script

1. checks that the two agree layer by layer, in float32 and in float64 models:
   ``max rel`` is the largest element-wise ``|ftdoctor − BackPACK| / BackPACK``
   over the weights (elements where both are 0 — dead units — count as equal),
   ``max/scale`` the largest ``|difference|`` over the layer's largest ``G²``;
2. times BackPACK's extended pass (forward + one backward that forms the
   gradient and ``sum_grad_squared``) against ftdoctor's probe pass with only
   ``change_rate`` and the ce loss (forward + one backward + squares); repeats
   are interleaved and the medians compared. Target (SPEC §7): ratio ≤ 1;
3. lists models BackPACK cannot (fully) handle but ftdoctor can.

Both sides run the model in eval mode, as ftdoctor's probe pass does; layer
lists are found once beforehand (``probe_model(layers=...)``), as BackPACK's
``extend`` is done once, so neither side's setup is timed. ftdoctor reports
weights only (``<layer>/grad_sq_mean``), so biases are not compared.
"""
from __future__ import annotations

import os

from _machine import Bundle, header, tensor_bundle  # before torch: sets OMP_WAIT_POLICY

import argparse  # noqa: E402
import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.model import layer_order, registered_affine_layers

try:
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared
    HAVE_BACKPACK = True
except ImportError:  # the comparison rows are skipped, the ftdoctor rows still run
    HAVE_BACKPACK = False

OPTIONS = ProbeOptions(probes=("change_rate",), change_rate_loss="ce")


# --------------------------------------------------------------- the models


class SmallCNN(nn.Module):
    """The contract's SmallCNN: plain conv net, no BatchNorm (BackPACK can take it whole)."""

    def __init__(self, num_classes: int = 10, in_ch: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class VGGish(nn.Module):
    """benchmarks/overhead.py's VGG-style net (six 3×3 convs, max-pooling, two Linear, no BN).

    ReLUs are not in-place here: BackPACK's hooks refuse an in-place op on a
    module's output ("Output 0 of BackwardHookFunction is a view and is being
    modified inplace"); ftdoctor does not mind either way.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        chans = [3, 32, 32, 64, 64, 128, 128]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    return tv_resnet18(num_classes=10)


def small_vit() -> nn.Module:
    """The contract's small ViT, with a random head: torchvision zero-initialises it, and a zero
    head sends no gradient into the body, so every G² below it would be 0 on both sides."""
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model


def tiny_convnext() -> nn.Module:
    """torchvision's ConvNeXt with two small stages: 7×7 depthwise conv, then channels-last
    LayerNorm → Linear → GELU → Linear on (N, H, W, C), layer scale, residual."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10)


# ----------------------------------------------------------------- the data


def make_bundle(batches: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64 * batches, 3, 32, 32, generator=g).to(dtype)
    y = torch.randint(0, 10, (64 * batches,), generator=g)
    return tensor_bundle(x, y, 10, 64)


# ------------------------------------------------------------ the two sides


def ftdoctor_pass(model: nn.Module, bundle: Bundle, layers) -> tuple[dict[str, np.ndarray], object]:
    """G² per layer weight from the change_rate probe with the ce loss."""
    run = probe_model(model, bundle, OPTIONS, layers=layers)
    arrays = run.results["change_rate"].arrays
    g2 = {key[: -len("/grad_sq_mean")]: arr for key, arr in arrays.items() if key.endswith("/grad_sq_mean")}
    return g2, run


def backpack_extend(model: nn.Module, use_converter: bool = False) -> tuple[nn.Module, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = extend(model, use_converter=use_converter)
    return ext, extend(nn.CrossEntropyLoss(reduction="sum"))


def backpack_pass(model: nn.Module, lossfn: nn.Module, bundle: Bundle) -> dict[str, np.ndarray]:
    """Σ over batches of ``param.sum_grad_squared`` (float64), divided by N, per weight."""
    weights = {name[: -len(".weight")]: p for name, p in model.named_parameters() if name.endswith(".weight")}
    acc: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no extension for Module ..." is reported by the caller
        for x, y, _ in bundle.loader():
            model.zero_grad(set_to_none=True)
            loss = lossfn(model(x), y)
            with backpack(SumGradSquared()):
                loss.backward()
            for name, p in weights.items():
                sq = getattr(p, "sum_grad_squared", None)
                if sq is not None:
                    acc[name] = acc[name] + sq.double() if name in acc else sq.double()
    model.zero_grad(set_to_none=True)
    return {name: (a / bundle.num_samples).numpy() for name, a in acc.items()}


@dataclass(frozen=True)
class Agreement:
    """How two sets of per-layer G² differ, over the layers both have."""

    max_rel: float          # worst element-wise |a − b| / max(|a|, |b|)
    max_scaled: float       # worst |a − b| / max|b| of the layer
    worst_layer: str
    layers: int             # layers compared
    above: int              # elements with rel. difference > 1e-5 ...
    above_size: float       # ... and the largest of them relative to its layer's max G²


def agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> Agreement:
    worst_rel, worst_scaled, worst_layer, n, above, above_size = 0.0, 0.0, "-", 0, 0, 0.0
    for name, a in ours.items():
        b = theirs.get(name)
        if b is None:
            continue
        n += 1
        a, b = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a - b)
        denom = np.maximum(np.abs(a), np.abs(b))
        rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1.0), 0.0)  # both 0: equal
        scale = max(float(np.abs(b).max()), 1e-300)
        if float(rel.max()) > worst_rel:
            worst_rel, worst_layer = float(rel.max()), name
        worst_scaled = max(worst_scaled, float(diff.max()) / scale)
        bad = rel > 1e-5
        above += int(bad.sum())
        if bad.any():
            above_size = max(above_size, float(denom[bad].max()) / scale)
    return Agreement(worst_rel, worst_scaled, worst_layer, n, above, above_size)


# ------------------------------------------------------------------ rows


def prepared(build: Callable[[], nn.Module], dtype: torch.dtype, use_converter: bool):
    """(ftdoctor's model, its layers, BackPACK's extended copy with the same weights, loss)."""
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    ref = copy.deepcopy(model)
    layers, _ = layer_order(model, torch.zeros(1, 3, 32, 32, dtype=dtype))
    bp_model, lossfn = backpack_extend(ref, use_converter) if HAVE_BACKPACK else (None, None)
    return model, layers, bp_model, lossfn


def check_row(name: str, build: Callable[[], nn.Module], batches: int, use_converter: bool) -> None:
    for dtype in (torch.float32, torch.float64):
        model, layers, bp_model, lossfn = prepared(build, dtype, use_converter)
        # BackPACK in float64 is slow (resnet18: ~30 s per batch on 2 cores): 2 batches are enough there
        bundle = make_bundle(batches if dtype == torch.float32 else min(batches, 2), dtype)
        ours, _ = ftdoctor_pass(model, bundle, layers)
        theirs = backpack_pass(bp_model, lossfn, bundle)
        a = agreement(ours, theirs)
        tag = "float32" if dtype == torch.float32 else "float64"
        print(f"  {name:<24} {tag} {bundle.num_samples // 64} batches {a.layers:2d}/{len(ours):2d} layers  "
              f"max rel {a.max_rel:7.1e} ({a.worst_layer})  max/scale {a.max_scaled:7.1e}  {_verdict(a)}")


def _verdict(a: Agreement) -> str:
    if a.max_rel <= 1e-5:
        return "ok"
    return f"{a.above} element(s) > 1e-5, all ≤ {a.above_size:.0e} × the layer's max G²"


def time_row(name: str, build: Callable[[], nn.Module], batches: int, repeats: int,
             use_converter: bool) -> tuple[float, float]:
    model, layers, bp_model, lossfn = prepared(build, torch.float32, use_converter)
    bundle = make_bundle(batches)
    ftdoctor_pass(model, bundle, layers)           # warm-up: allocator, kernels, thread pool
    backpack_pass(bp_model, lossfn, bundle)
    ours_t, theirs_t = [], []
    for i in range(repeats):                       # interleaved, alternating who goes first
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            if side == 0:
                ftdoctor_pass(model, bundle, layers)
                ours_t.append(time.perf_counter() - t0)
            else:
                backpack_pass(bp_model, lossfn, bundle)
                theirs_t.append(time.perf_counter() - t0)
    ours, theirs = statistics.median(ours_t), statistics.median(theirs_t)
    print(f"  {name:<26} ftdoctor {1000 * ours / batches:7.1f} ms/batch   "
          f"BackPACK {1000 * theirs / batches:7.1f} ms/batch   ratio {ours / theirs:5.2f}x   "
          f"(ratio range {min(ours_t) / max(theirs_t):.2f}–{max(ours_t) / min(theirs_t):.2f})")
    return ours, theirs


# BackPACK's long messages, said short (the cause is in the model's code, named here)
_KNOWN = {
    "is a view and is being modified inplace": "an in-place op on a hooked module's output "
                                               "(in-place ReLU, or the residual `out += identity`)",
    "BatchNorm module in training mode": "BatchNorm in training mode is not supported",
    "Expecting types [float, Node]": "its torch.fx converter cannot rewrite the graph "
                                     "(Expecting types [float, Node], got [Node, Node])",
    "as child module 'output'": "BackPACK keeps each module's output in `module.output`, and the model has "
                                "submodules named `output`",
    "calling .item() on a Tensor": "data-dependent control flow in the model (its attention-mask checks read a "
                                   "tensor's value), which vmap cannot batch",
    "This layer has buffers and is not supported by Opacus": "BatchNorm (a layer with buffers) is not "
                                                             "supported by Opacus",
}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for needle, short in _KNOWN.items():
        if needle in text:
            return f"{type(exc).__name__}: {short}"
    return f"{type(exc).__name__}: {text[:100]}{'…' if len(text) > 100 else ''}"


def backpack_attempt(build: Callable[[], nn.Module], train: bool, use_converter: bool) -> tuple[str, dict]:
    """One BackPACK try on one batch: a short verdict and its G² (empty on error)."""
    torch.manual_seed(0)
    model = build().train(train)
    bundle = make_bundle(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ext, lossfn = backpack_extend(model, use_converter)
            ext.train(train)
            g2 = backpack_pass(ext, lossfn, bundle)
    except Exception as exc:  # noqa: BLE001 - the point is to show what BackPACK says
        return f"error, {first_line(exc)}", {}
    missing = sorted({str(w.message).split("<class '")[1].split("'>")[0].rsplit(".", 1)[-1]
                      for w in caught if "does not have an extension for Module" in str(w.message)})
    total = sum(1 for _ in ext.parameters())
    have = sum(1 for p in ext.parameters() if getattr(p, "sum_grad_squared", None) is not None)
    verdict = f"ran, sum_grad_squared on {have}/{total} parameters"
    if missing:
        verdict += f"; warns 'no extension' for {', '.join(missing)}"
    return verdict, g2


def unsupported_row(name: str, build: Callable[[], nn.Module], tries: list[tuple[str, bool, bool]]) -> None:
    torch.manual_seed(0)
    model = build().eval()
    bundle = make_bundle(1)
    try:
        layers, _ = layer_order(model, bundle.dataset[0][0][None])
        ours, run = ftdoctor_pass(model, bundle, layers)
        skipped = [s for s in run.skipped if s.probe in ("change_rate", "all")]
        ft = f"ok, {len(ours)} layers measured, {len(skipped)} skipped"
        if skipped:
            ft += " (" + "; ".join(sorted({_skip_text(s) for s in skipped}))[:120] + ")"
        accounted = {layer.name for layer in layers} | {s.name for s in skipped}
        silent = [l.name for l in registered_affine_layers(model) if l.name not in accounted]
        if silent:  # an affine module neither measured nor listed as skipped would be a silent gap
            ft += f"; {len(silent)} affine module(s) neither measured nor listed as skipped: {silent[0]}, …"
    except Exception as exc:  # noqa: BLE001
        ours, ft = {}, f"error, {first_line(exc)}"
    print(f"  {name}")
    if not HAVE_BACKPACK:
        print("    BackPACK: not installed")
    for label, train, conv in tries if HAVE_BACKPACK else []:
        verdict, theirs = backpack_attempt(build, train, conv)
        if theirs and not train:
            a = agreement(ours, theirs)
            if a.layers:
                verdict += (f"; on the {a.layers} layers both measure, max rel diff {a.max_rel:.1e}"
                            + ("" if a.max_rel <= 1e-5 else f" ({_verdict(a)})"))
        print(f"    BackPACK ({label}): {verdict}")
    print(f"    ftdoctor (eval): {ft}")


def _skip_text(skipped) -> str:
    return skipped.reason.split(":")[0].split(" (")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    if not HAVE_BACKPACK:
        print("BackPACK is not installed: pip install -r benchmarks/requirements.txt "
              "(the side-by-side rows are skipped)")
    else:
        from importlib.metadata import version
        print(f"BackPACK {version('backpack-for-pytorch')}; batch 64 at 32x32, {args.batches} batches, "
              f"model in eval mode on both sides")
    models = [("SmallCNN (contract)", SmallCNN, False), ("VGG-style (no BN)", VGGish, False),
              ("resnet18 (BackPACK: fx)", resnet18, True)]
    if HAVE_BACKPACK:
        print("\nG² per layer weight, ftdoctor change_rate (ce) vs BackPACK SumGradSquared / N:")
        for name, build, conv in models:
            check_row(name, build, args.batches, conv)
        print(f"\ntime of one pass over the batches, median of {args.repeats} interleaved repeats "
              "(ratio = ftdoctor / BackPACK):")
        for name, build, conv in models:
            time_row(name, build, args.batches, args.repeats, conv)
    print("\nmodels beyond BackPACK's SumGradSquared (one batch; BackPACK tried as extend(model), then with "
          "use_converter=True):")
    unsupported_row("torchvision resnet18", resnet18, [
        ("train mode", True, False), ("train mode, use_converter", True, True),
        ("eval mode", False, False), ("eval mode, use_converter", False, True)])
    unsupported_row("small VisionTransformer (LayerNorm, MultiheadAttention)", small_vit, [
        ("eval mode", False, False), ("eval mode, use_converter", False, True)])
    unsupported_row("tiny ConvNeXt (channels-last Linear, LayerNorm, layer scale)", tiny_convnext, [
        ("eval mode", False, False), ("eval mode, use_converter", False, True)])
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
