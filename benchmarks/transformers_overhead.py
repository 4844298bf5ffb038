"""Cost of the probe pass on transformers, against a plain training step and against Opacus.

    python benchmarks/transformers_overhead.py [--repeats 5] [--batches 8] [--threads 2]

Two small transformers, random weights (nothing is downloaded):

* a ViT (timm ``vit_tiny_patch16_224`` at 64×64, batch 32),
* a BERT-style text classifier (Hugging Face ``BertForSequenceClassification``, 4 layers, width 128,
  sequences of 64 tokens with padding, batch 32).

For each, the median over interleaved repeats of

* a plain training step (forward + backward of the mean cross-entropy) per batch,
* ftdoctor's probe pass with the exact per-example squares of every measured layer (noise, change_rate,
  grad_norm),
* Opacus's ``GradSampleModule`` on the same batches: a forward and backward of the random linear loss, then
  the per-sample gradients squared and summed per parameter (the same quantity as ``change_rate``'s G²),

and their ratios to the training step. Needs ``timm``, ``transformers`` and ``opacus``.
"""
from __future__ import annotations

from _machine import start  # before torch: sets OMP_WAIT_POLICY

import argparse  # noqa: E402
import statistics
import warnings
import time

import torch
import torch.nn.functional as F

from ftdoctor.diagnose import ProbeOptions, probe_model

warnings.filterwarnings("ignore", message="Full backward hook is firing")


class _Items(torch.utils.data.Dataset):
    def __init__(self, inputs, y):
        self.inputs, self.y = inputs, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, int(self.y[i]), i


class Bundle:
    """What probe_model reads: a dataset of (inputs, label, index), its size and class count."""

    def __init__(self, inputs, y, num_classes, batch_size):
        self.dataset = _Items(inputs, y)
        self.num_samples, self.num_classes, self.batch_size = len(y), num_classes, batch_size


def vit(batch: int, batches: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    x = torch.randn(batch * batches, 3, 64, 64)
    return "ViT-tiny 64px", model, x, torch.randint(0, 10, (len(x),)), 10, lambda m, b: m(b)


def bert(batch: int, batches: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=8000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=128, num_labels=4,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    n, length = batch * batches, 64
    ids = torch.randint(1, 8000, (n, length))
    lengths = torch.randint(16, length + 1, (n,))
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    return ("BERT-mini 64 tokens", model, inputs, torch.randint(0, 4, (n,)), 4,
            lambda m, b: m(**b).logits)


def batches_of(inputs, y, batch):
    for lo in range(0, len(y), batch):
        x = {k: v[lo:lo + batch] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[lo:lo + batch]
        yield x, y[lo:lo + batch]


def train_step(model, inputs, y, batch, call):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x, t in batches_of(inputs, y, batch):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(call(model, x), t).backward()
        opt.step()
    model.eval()


def probe(model, inputs, y, classes, batch):
    probe_model(model, Bundle(inputs, y, classes, batch), ProbeOptions(probes=("noise", "change_rate", "grad_norm")))


def opacus_squares(gsm, inputs, y, batch, call):
    sums = {}
    for x, t in batches_of(inputs, y, batch):
        gsm.zero_grad(set_to_none=True)
        out = call(gsm, x)
        (torch.randn_like(out) * out).sum().backward()
        for name, p in gsm.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                sq = (gs.double() ** 2).sum(0)
                sums[name] = sums[name] + sq if name in sums else sq
            p.grad_sample = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = start(parser)
    print(f"{'model':<22}{'train step':>12}{'probe (exact)':>16}{'ratio':>8}{'Opacus G²':>12}{'ratio':>8}")
    for make in (vit, bert):
        name, model, inputs, y, classes, call = make(args.batch, args.batches)
        model.eval()
        gsm, why = None, ""
        try:
            import copy

            import opacus
            # Opacus captures activations in train mode only (no dropout in these models: the same function)
            gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum", strict=False).train()
        except Exception as exc:  # noqa: BLE001 - a model Opacus cannot wrap: say why
            why = f"{type(exc).__name__}: {str(exc)[:60]}"
        times = {"train": [], "probe": [], "opacus": []}
        for _ in range(args.repeats):
            for key, fn in (("train", lambda: train_step(model, inputs, y, args.batch, call)),
                            ("probe", lambda: probe(model, inputs, y, classes, args.batch)),
                            ("opacus", (lambda: opacus_squares(gsm, inputs, y, args.batch, call)) if gsm else None)):
                if fn is None:
                    continue
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001
                    if key == "opacus":
                        why, gsm = f"{type(exc).__name__}: {str(exc)[:60]}", None
                        continue
                    raise
                times[key].append(time.perf_counter() - t0)
        train = statistics.median(times["train"])
        pr = statistics.median(times["probe"])
        line = f"{name:<22}{train:>11.2f}s{pr:>15.2f}s{pr / train:>7.2f}×"
        if times["opacus"] and gsm is not None:
            op = statistics.median(times["opacus"])
            line += f"{op:>11.2f}s{op / train:>7.2f}×"
        else:
            line += f"   Opacus could not run it: {why}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
