"""A Hugging Face ViT image classifier through the library (``.logits`` output, its own attention module):
exact per-example squares of every measured layer — patch embedding, LayerNorms, q/k/v/o projections, MLP,
head — equal a per-example autograd loop in float64, and Opacus's GradSampleModule on the layers it supports."""
from __future__ import annotations

import pytest
import torch

from helpers import TensorBundle
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.rng import example_normals

transformers = pytest.importorskip("transformers")


def tiny_vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).double().eval()


def _per_example(model, x, names, seed=3, classes=3):
    modules = dict(model.named_modules())
    acc = {k: torch.zeros_like(modules[k].weight) for k in names}
    for i in range(len(x)):
        logits = model(x[i:i + 1]).logits
        ell = (example_normals(seed, torch.tensor([i]), classes).to(logits.dtype) * logits).sum()
        grads = torch.autograd.grad(ell, [modules[k].weight for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                acc[k] += g ** 2
    return {k: v / len(x) for k, v in acc.items()}


def test_a_vit_s_squares_equal_a_per_example_loop_and_opacus():
    model = tiny_vit()
    x = torch.randn(10, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (10,))
    run = probe_model(model, TensorBundle(x, y, 3, batch_size=4), ProbeOptions(probes=("change_rate",), seed=3))
    rows = {l["name"]: l for l in run.results["change_rate"].figures["layers"]}
    names = list(rows)
    assert names[0] == "vit.embeddings.patch_embeddings.projection"
    assert {"vit.layers.0.attention.q_proj", "vit.layers.0.layernorm_before", "vit.layernorm",
            "classifier"} <= set(names)
    want = _per_example(model, x, names)
    for k in names:
        got = torch.as_tensor(run.results["change_rate"].arrays[f"{k}/grad_sq_mean"])
        scale = want[k].abs().max().clamp_min(1e-300)
        assert ((got - want[k]).abs().max() / scale).item() < 1e-5, k

    opacus = pytest.importorskip("opacus")
    gsm = opacus.GradSampleModule(tiny_vit().train(), batch_first=True, loss_reduction="sum", strict=False)
    eta = example_normals(3, torch.arange(10), 3).to(torch.float64)
    (eta * gsm(x).logits).sum().backward()
    compared = 0
    for name, module in gsm._module.named_modules():
        sample = getattr(getattr(module, "weight", None), "grad_sample", None)
        if name in rows and sample is not None:
            got = torch.as_tensor(run.results["change_rate"].arrays[f"{name}/grad_sq_mean"])
            theirs = (sample ** 2).sum(0) / 10
            assert ((got - theirs).abs().max() / theirs.abs().max()).item() < 1e-5, name
            compared += 1
    assert compared >= 10
