"""ftdoctor's per-example gradient squares side by side with every per-example peer.

    python benchmarks/peers.py [--repeats 3] [--batches 16] [--batch 64] [--threads 2] [--device cpu]
                               [--models SmallCNN,VGGish,resnet18,tiny_convnext,vit,bert]
    pip install -r benchmarks/requirements.txt      # BackPACK and Opacus, for their rows

The quantity is ``change_rate``'s G² with ``--change-rate-loss ce``: per weight, the squared gradient of each
example's cross-entropy, summed over the examples and divided by their number. Three peers compute the same:

* BackPACK's ``SumGradSquared`` (``extend(model)``; a loss with ``reduction="sum"``);
* Opacus's ``GradSampleModule``: the per-sample gradients (``p.grad_sample``) squared and summed;
* ``torch.func``: ``vmap(grad(loss of one example))`` over the batch, squared and summed.

For each model of ``benchmarks/_models.py`` — the contract's SmallCNN, a VGG-style net, torchvision's
resnet18, a tiny torchvision ConvNeXt, a small timm ViT and a small Hugging Face BERT — and each peer, the
script checks that the figures agree within 1e-5 relative on every weight both measure (in float64: float32's
rounding alone differs by more than that on small G²), then times one pass over the same batches (median of
interleaved repeats) and prints ftdoctor's time over the peer's. BackPACK is tried as ``extend(model)`` and,
when that fails, with its torch.fx converter (``use_converter=True``). A peer that cannot run a model gets a
row that says why, and a weight a peer does not measure is counted. Every model runs in eval mode on every
side (Opacus needs its modules in training mode to record activations: its BatchNorm layers are kept in
eval mode, so the function is the same). Neither side's setup (finding the layers, wrapping the model) is
timed. The batches are the probe's defaults, as in ``overhead.py``: 16 batches of 64 (1,024 examples).
ftdoctor's timed call is a whole probe run — the pass, then its figures and findings — and the peer's its
loop alone: over a few small batches of a tiny model that fixed cost of a run (about 4 ms) decides the
ratio (the contract's SmallCNN, 4 batches of 32: 0.97–1.07× Opacus's time; 16 batches of 64: 0.85–0.86×).
"""
from __future__ import annotations

from _machine import batches_of, inputs_bundle, start  # before torch: the allocator settings

import argparse  # noqa: E402
import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _models import SmallCNN, VGGish, bert, cnn, resnet18, tiny_convnext, vit
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.forward import as_logits, head, to_device
from ftdoctor.model import layer_order

warnings.filterwarnings("ignore")
OPTIONS = ProbeOptions(probes=("change_rate",), change_rate_loss="ce")


MODELS = [cnn(SmallCNN, "SmallCNN (contract)"), cnn(VGGish, "VGG-style (no BN)"), cnn(resnet18, "torchvision resnet18"),
          cnn(tiny_convnext, "torchvision ConvNeXt (2 small stages)"), vit, bert]


# ------------------------------------------------------------------------------------- the sides
def ftdoctor_g2(model: nn.Module, inputs: Any, y: torch.Tensor, classes: int, batch: int, layers) -> dict:
    device = next(model.parameters()).device
    run = probe_model(model, inputs_bundle(inputs, y, classes, batch), OPTIONS, layers=layers, device=device)
    return {k[: -len("/grad_sq_mean")] + ".weight": a for k, a in run.results["change_rate"].arrays.items()
            if k.endswith("/grad_sq_mean")}


def double(inputs: Any) -> Any:
    """Float inputs in float64 (token ids stay integers)."""
    if isinstance(inputs, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    return inputs.double()


def _batches(inputs: Any, y: torch.Tensor, batch: int, stop: int | None):
    for i, b in enumerate(batches_of(inputs, y, batch)):
        if stop is not None and i >= stop:
            return
        yield b


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".weight")}


def _mean(acc: dict[str, torch.Tensor], n: int) -> dict[str, np.ndarray]:
    return {k: (v / n).cpu().numpy() for k, v in acc.items()}


def backpack_g2(prepared: Any, inputs: Any, y: torch.Tensor, batch: int, call,
                stop: int | None = None) -> dict:
    from backpack import backpack
    from backpack.extensions import SumGradSquared
    model, lossfn = prepared
    acc: dict[str, torch.Tensor] = {}
    for x, t in _batches(inputs, y, batch, stop):
        model.zero_grad(set_to_none=True)
        loss = lossfn(call(model, x), t)
        with backpack(SumGradSquared()):
            loss.backward()
        for name, p in _weights(model).items():
            sq = getattr(p, "sum_grad_squared", None)
            if sq is not None:
                acc[name] = acc[name] + sq.double() if name in acc else sq.double()
    return _mean(acc, min(len(y), batch * stop) if stop else len(y))


def backpack_prepare(model: nn.Module, use_converter: bool = False) -> Any:
    from backpack import extend
    return extend(copy.deepcopy(model), use_converter=use_converter), extend(nn.CrossEntropyLoss(reduction="sum"))


def backpack_fx_prepare(model: nn.Module) -> Any:
    """BackPACK's second try: its torch.fx converter rewrites in-place ops and residual additions into modules."""
    return backpack_prepare(model, use_converter=True)


def opacus_prepare(model: nn.Module) -> Any:
    import opacus
    gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum", strict=False).train()
    for m in gsm.modules():         # Opacus records activations in training mode; BatchNorm keeps eval's function
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.Dropout):
            m.eval()
    return gsm


def opacus_g2(gsm: Any, inputs: Any, y: torch.Tensor, batch: int, call,
              stop: int | None = None) -> dict:
    acc: dict[str, torch.Tensor] = {}
    for x, t in _batches(inputs, y, batch, stop):
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(call(gsm, x), t, reduction="sum").backward()
        for name, p in gsm.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if gs is not None and name.endswith(".weight"):
                sq = (gs.double() ** 2).sum(0)
                key = name.removeprefix("_module.")
                acc[key] = acc[key] + sq if key in acc else sq
            p.grad_sample = None
    return _mean(acc, min(len(y), batch * stop) if stop else len(y))


def vmap_prepare(model: nn.Module) -> Any:
    from torch.func import functional_call, grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: dict, x: Any, t: torch.Tensor) -> torch.Tensor:
        if isinstance(x, dict):         # one example's token ids and mask, as keywords
            out = functional_call(model, (p, buffers), (), {k: v[None] for k, v in x.items()})
        else:
            out = functional_call(model, (p, buffers), (x[None],))
        return F.cross_entropy(as_logits(out), t[None])
    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=8)
    return params, per_example


def vmap_g2(prepared: Any, inputs: Any, y: torch.Tensor, batch: int, call,
            stop: int | None = None) -> dict:
    params, per_example = prepared
    acc: dict[str, torch.Tensor] = {}
    for x, t in _batches(inputs, y, batch, stop):
        grads = per_example(params, x, t)
        for name, g in grads.items():
            if name.endswith(".weight"):
                sq = (g.double() ** 2).sum(0)
                acc[name] = acc[name] + sq if name in acc else sq
    return _mean(acc, min(len(y), batch * stop) if stop else len(y))


#: each peer's ways to wrap a model, tried in order (row label, what the try is, prepare), and its G² pass
def loop_g2(model: nn.Module, inputs: Any, y: torch.Tensor, batch: int, call, names: list[str]) -> dict:
    """The truth on the first batch, for when the two sides differ: one autograd call per example."""
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in names}
    x, t = next(batches_of(inputs, y, batch))
    for i in range(len(t)):
        one = {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]
        loss = F.cross_entropy(as_logits(call(model, one)), t[i:i + 1])
        for k, g in zip(names, torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)):
            if g is not None:
                acc[k] += g.double() ** 2
    return _mean(acc, len(t))


PEERS = {"BackPACK": ([("", "extend(model)", backpack_prepare),
                      (" (fx)", "use_converter=True", backpack_fx_prepare)], backpack_g2),
         "Opacus": ([("", "", opacus_prepare)], opacus_g2),
         "torch.func vmap": ([("", "", vmap_prepare)], vmap_g2)}


@dataclass(frozen=True)
class Agreement:
    """How two sets of per-weight G² differ, over the weights both have."""

    max_rel: float          # worst element-wise |a − b| / max(|a|, |b|) (both 0: equal)
    worst: str              # the weight where it is
    compared: int           # weights compared


def agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> Agreement:
    worst_rel, worst, n = 0.0, "-", 0
    for name, a in ours.items():
        b = theirs.get(name)
        if b is None:
            continue
        n += 1
        a, b = a.astype(np.float64), b.astype(np.float64)
        denom = np.maximum(np.abs(a), np.abs(b))
        rel = np.where(denom > 0, np.abs(a - b) / np.where(denom > 0, denom, 1.0), 0.0)
        if float(rel.max()) > worst_rel:
            worst_rel, worst = float(rel.max()), name
    return Agreement(worst_rel, worst, n)


# a peer's long messages, said short (the cause is in the model's code, named here)
_KNOWN = {
    "is a view and is being modified inplace": "an in-place op on a hooked module's output "
                                               "(e.g. an in-place ReLU, or a residual `out += identity`)",
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


# ------------------------------------------------------------------------------------------ rows
def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...: every side runs there")
    parser.add_argument("--models", default=",".join(m.__name__ for m in MODELS),
                        help="comma-separated, from: " + ", ".join(m.__name__ for m in MODELS))
    args = start(parser)
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - {m.__name__ for m in MODELS})
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    device = torch.device(args.device)
    n = args.batch * args.batches
    print(f"batch {args.batch}, {args.batches} batches; G² = Σ_i (∂ CE_i / ∂W)² / N per weight, eval mode on "
          f"every side; ratio = ftdoctor's time / the peer's (below 1: ftdoctor is faster)")
    for make in (m for m in MODELS if m.__name__ in chosen):
        try:
            name, model, inputs, y, classes, call = make(n)
        except ImportError as exc:
            print(f"\n{make.__name__}: not run ({exc.name} is not installed)")
            continue
        model = model.to(device)
        inputs, y = to_device(inputs, device), y.to(device)
        print(f"\n{name}", flush=True)
        # found once, as the peers wrap their model once: neither side's setup is timed
        layers, _ = layer_order(model, head(inputs, 1))
        # equality in float64, on one batch: float32's rounding alone differs by more than 1e-5 on small G²
        model64, inputs64 = copy.deepcopy(model).double(), double(inputs)
        layers64, _ = layer_order(model64, head(inputs64, 1))
        ours = ftdoctor_g2(model64, head(inputs64, args.batch), y[:args.batch], classes, args.batch, layers64)
        for peer, (ways, g2) in PEERS.items():
            tried: list[str] = []
            for label, how, prepare in ways:
                try:
                    theirs = g2(prepare(model64), inputs64, y, args.batch, call, stop=1)
                    prepared = prepare(model)
                    break
                except ImportError as exc:
                    tried = [f"not installed ({exc.name})"]
                    break
                except Exception as exc:  # noqa: BLE001 - what the peer says is the row
                    tried.append((f"{how}: " if len(ways) > 1 else "") + first_line(exc))
            else:
                print(f"  {peer:<20} cannot run it: " + "; ".join(tried))
                continue
            if tried and tried[0].startswith("not installed"):
                print(f"  {peer:<20} {tried[0]}")
                continue
            peer_name = peer + label
            a = agreement(ours, theirs)
            missing = len(ours) - a.compared
            same = "equal"
            if a.max_rel > 1e-5:     # who is right: a per-example loop on the same batch decides
                truth = loop_g2(model64, inputs64, y, args.batch, call, [a.worst])
                mine, theirs_rel = (agreement({a.worst: d[a.worst]}, truth).max_rel for d in (ours, theirs))
                same = (f"DIFFER at {a.worst}: a per-example autograd loop agrees with "
                        + (f"ftdoctor (max rel {mine:.0e}), not with {peer}" if mine <= 1e-5 < theirs_rel
                           else f"{peer} (max rel {theirs_rel:.0e}), not with ftdoctor" if theirs_rel <= 1e-5 < mine
                           else f"neither (ftdoctor {mine:.0e}, {peer} {theirs_rel:.0e})"))
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for i in range(args.repeats):
                order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
                for side in order:
                    times[side].append(timed(
                        (lambda: ftdoctor_g2(model, inputs, y, classes, args.batch, layers)) if side == "ours"
                        else (lambda: g2(prepared, inputs, y, args.batch, call))))
            ours_t, theirs_t = statistics.median(times["ours"]), statistics.median(times["theirs"])
            note = f"; {missing} weight(s) it does not measure" if missing else ""
            print(f"  {peer_name:<20} {a.compared:3d} weights {same} (max rel {a.max_rel:.1e}){note}   "
                  f"ftdoctor {1000 * ours_t / args.batches:7.1f} ms/batch   {peer_name} "
                  f"{1000 * theirs_t / args.batches:7.1f} ms/batch   ratio {ours_t / theirs_t:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
