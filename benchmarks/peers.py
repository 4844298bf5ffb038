"""ftdoctor's per-example gradient squares side by side with every per-example peer.

    python benchmarks/peers.py [--repeats 3] [--batches 4] [--batch 32] [--threads 2] [--device cpu]
    pip install -r benchmarks/requirements.txt      # BackPACK and Opacus, for their rows

The quantity is ``change_rate``'s G² with ``--change-rate-loss ce``: per weight, the squared gradient of each
example's cross-entropy, summed over the examples and divided by their number. Three peers compute the same:

* BackPACK's ``SumGradSquared`` (``extend(model)``; a loss with ``reduction="sum"``);
* Opacus's ``GradSampleModule``: the per-sample gradients (``p.grad_sample``) squared and summed;
* ``torch.func``: ``vmap(grad(loss of one example))`` over the batch, squared and summed.

For each model — the contract's SmallCNN, a VGG-style net, torchvision's resnet18, a small timm ViT and a
small Hugging Face BERT — and each peer, the script checks that the figures agree within 1e-5 relative on
every weight both measure, then times one pass over the same batches (median of interleaved repeats) and
prints ftdoctor's time over the peer's. A peer that cannot run a model gets a row that says why. Every
model runs in eval mode on every side (Opacus needs its modules in training mode to record activations:
its BatchNorm layers are kept in eval mode, so the function is the same).
"""
from __future__ import annotations

from _machine import start  # before torch: sets OMP_WAIT_POLICY

import argparse  # noqa: E402
import copy
import statistics
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backpack_compare import VGGish, SmallCNN, agreement, first_line
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.forward import as_logits, head, to_device
from ftdoctor.model import layer_order
from transformers_overhead import Bundle, batches_of

warnings.filterwarnings("ignore")
OPTIONS = ProbeOptions(probes=("change_rate",), change_rate_loss="ce")


# ---------------------------------------------------------------------------------------- models
def images(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def cnn(build: Callable[[], nn.Module], name: str) -> Callable[[int], tuple]:
    def make(n: int) -> tuple:
        torch.manual_seed(0)
        x, y = images(n)
        return name, build().eval(), x, y, 10, lambda m, b: m(b)
    return make


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    return tv_resnet18(num_classes=10)


def vit(n: int) -> tuple:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=4)
    x, y = images(n)
    return "timm ViT-tiny (4 blocks, 32px)", model.eval(), x, y, 10, lambda m, b: m(b)


def bert(n: int) -> tuple:
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=4000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, num_labels=4,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    length = 32
    ids = torch.randint(1, 4000, (n, length), generator=g)
    lengths = torch.randint(8, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ("HF BERT-mini (2 layers, 32 tokens)", model, {"input_ids": ids * mask, "attention_mask": mask},
            torch.randint(0, 4, (n,), generator=g), 4, lambda m, b: m(**b).logits)


MODELS = [cnn(SmallCNN, "SmallCNN (contract)"), cnn(VGGish, "VGG-style (no BN)"), cnn(resnet18, "torchvision resnet18"),
          vit, bert]


# ------------------------------------------------------------------------------------- the sides
def ftdoctor_g2(model: nn.Module, inputs: Any, y: torch.Tensor, classes: int, batch: int, layers) -> dict:
    device = next(model.parameters()).device
    run = probe_model(model, Bundle(inputs, y, classes, batch), OPTIONS, layers=layers, device=device)
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


def backpack_prepare(model: nn.Module) -> Any:
    from backpack import extend
    return extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))


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


PEERS = {"BackPACK": (backpack_prepare, backpack_g2), "Opacus": (opacus_prepare, opacus_g2),
         "torch.func vmap": (vmap_prepare, vmap_g2)}


# ------------------------------------------------------------------------------------------ rows
def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...: every side runs there")
    args = start(parser)
    device = torch.device(args.device)
    n = args.batch * args.batches
    print(f"batch {args.batch}, {args.batches} batches; G² = Σ_i (∂ CE_i / ∂W)² / N per weight, eval mode on "
          f"every side; ratio = ftdoctor's time / the peer's (below 1: ftdoctor is faster)")
    for make in MODELS:
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
        for peer, (prepare, g2) in PEERS.items():
            try:
                theirs = g2(prepare(model64), inputs64, y, args.batch, call, stop=1)
                prepared = prepare(model)
            except ImportError as exc:
                print(f"  {peer:<16} not installed ({exc.name})")
                continue
            except Exception as exc:  # noqa: BLE001 - what the peer says is the row
                print(f"  {peer:<16} cannot run it: {first_line(exc)}")
                continue
            a = agreement(ours, theirs)
            missing = len(ours) - a.layers
            same = "equal" if a.max_rel <= 1e-5 else f"DIFFER (max rel {a.max_rel:.1e} at {a.worst_layer})"
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for i in range(args.repeats):
                order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
                for side in order:
                    times[side].append(timed(
                        (lambda: ftdoctor_g2(model, inputs, y, classes, args.batch, layers)) if side == "ours"
                        else (lambda: g2(prepared, inputs, y, args.batch, call))))
            ours_t, theirs_t = statistics.median(times["ours"]), statistics.median(times["theirs"])
            note = f"; {missing} weight(s) it does not measure" if missing else ""
            print(f"  {peer:<16} {a.layers:3d} weights {same} (max rel {a.max_rel:.1e}){note}   "
                  f"ftdoctor {1000 * ours_t / args.batches:7.1f} ms/batch   {peer} "
                  f"{1000 * theirs_t / args.batches:7.1f} ms/batch   ratio {ours_t / theirs_t:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
