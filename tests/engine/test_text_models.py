"""A Hugging Face BERT-style text classifier through the library (keyword inputs, ``.logits`` output):
exact per-example squares of every measured layer — word embeddings, LayerNorms, attention and MLP
Linears over tokens, the head — equal a per-example autograd loop, padded positions contributing nothing."""
from __future__ import annotations

import pytest
import torch

from helpers import TensorBundle
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.rng import example_normals

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
        self.ids, self.mask, self.y = ids, mask, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, int(self.y[i]), i


class TokenBundle(TensorBundle):
    def __init__(self, ids, mask, y, num_classes, batch_size):
        super().__init__(ids.float(), y, num_classes, batch_size)
        self.ids, self.mask = ids, mask

    @property
    def dataset(self):
        return _Tokens(self.ids, self.mask, self.y)


def tiny_bert(num_labels: int = 3):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().eval()


def test_a_text_classifier_s_squares_equal_a_per_example_loop():
    model = tiny_bert()
    n, length = 12, 10
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask                                     # [PAD] = 0 after each sentence
    y = torch.randint(0, 3, (n,), generator=g)
    bundle = TokenBundle(ids, mask, y, 3, batch_size=5)
    run = probe_model(model, bundle, ProbeOptions(probes=("change_rate", "grad_norm"), seed=3))
    rows = {l["name"]: l for l in run.results["change_rate"].figures["layers"]}
    names = list(rows)
    skipped = {s.name: s.reason for s in run.skipped}
    # broadcast over the batch: its per-example gradients are not in its own output's gradient
    assert "bert.embeddings.position_embeddings" not in rows
    assert "shared by the whole batch" in skipped["bert.embeddings.position_embeddings"]
    assert names[0] == "bert.embeddings.word_embeddings" and rows[names[0]]["role"] == "embedding"
    assert "bert.encoder.layer.0.attention.self.query" in rows and "bert.embeddings.LayerNorm" in rows
    assert run.results["grad_norm"].figures["layers"][0]["name"] == "bert.embeddings.word_embeddings"
    modules = dict(model.named_modules())
    acc = {k: torch.zeros_like(modules[k].weight) for k in names}
    for i in range(n):
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        ell = (example_normals(3, torch.tensor([i]), 3).to(logits.dtype) * logits).sum()
        for k, grad in zip(names, torch.autograd.grad(ell, [modules[k].weight for k in names], allow_unused=True)):
            if grad is not None:
                acc[k] += grad ** 2
    for k in names:
        want = acc[k] / n
        got = torch.as_tensor(run.results["change_rate"].arrays[f"{k}/grad_sq_mean"])
        scale = want.abs().max().clamp_min(1e-300)
        assert ((got - want).abs().max() / scale).item() < 1e-5, k
    # padded positions contribute nothing: the [PAD] row's squares are zero
    pad = torch.as_tensor(run.results["change_rate"].arrays["bert.embeddings.word_embeddings/grad_sq_mean"])[0]
    assert float(pad.abs().max()) == 0.0


def test_what_stands_at_padded_positions_changes_no_figure():
    """Every probe, the activation R² against a reference included, is blind to the tokens behind the padding:
    the same texts padded with other ids give the same figures."""
    model = tiny_bert()
    reference = tiny_bert()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n, length = 10, 9
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(3, length, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, length), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    other = torch.where(mask.bool(), ids, torch.randint(1, 50, (n, length), generator=g))
    runs = []
    for tokens in (ids * mask, other):
        bundle = TokenBundle(tokens, mask, y, 3, batch_size=4)
        runs.append(probe_model(model, bundle, ProbeOptions(probes=("noise", "change_rate", "grad_norm", "r2"),
                                                            seed=1), reference=reference))
    for name in ("noise", "change_rate", "grad_norm", "r2"):
        a, b = runs[0].results[name].figures.to_json(), runs[1].results[name].figures.to_json()
        assert _close(a, b), name
    assert runs[0].results["r2"].figures.to_json()["layers"], "R² measured"


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, z) for x, z in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b


def test_a_text_model_s_random_backward_forms_no_weight_gradient():
    """The embeddings that read the token ids are the roots: the random loss's backward stops at their outputs,
    as it stops at an image model's first layers, and forms no weight gradient at all."""
    model = tiny_bert()
    n, length = 8, 6
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones_like(ids)
    formed = []
    handles = [p.register_hook(lambda grad, name=name: formed.append(name)) for name, p in model.named_parameters()]
    try:
        run = probe_model(model, TokenBundle(ids, mask, torch.randint(0, 3, (n,), generator=g), 3, batch_size=4),
                          ProbeOptions(probes=("change_rate",)))
    finally:
        for h in handles:
            h.remove()
    assert formed == []
    assert "bert.encoder.layer.1.output.dense" in {l["name"] for l in run.results["change_rate"].figures["layers"]}


class _TwoPaths(torch.nn.Module):
    """Token ids reach ``a`` through a functional embedding (no affine module: no root below ``a``) and ``b``
    through an ``nn.Embedding`` (a root)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(20, 8))
        self.emb = torch.nn.Embedding(20, 8)
        self.a, self.b, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        u = self.a(torch.nn.functional.embedding(ids, self.table))
        return self.head(torch.tanh(u + self.b(self.emb(ids))).mean(1))


def test_a_layer_above_no_root_is_still_measured_exactly():
    torch.manual_seed(0)
    model = _TwoPaths().double().eval()
    n = 9
    g = torch.Generator().manual_seed(4)
    ids, y = torch.randint(0, 20, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)
    run = probe_model(model, TensorBundle(ids, y, 3, batch_size=4), ProbeOptions(probes=("change_rate",), seed=5))
    names = ["emb", "a", "b", "head"]
    assert {l["name"] for l in run.results["change_rate"].figures["layers"]} == set(names)
    modules = dict(model.named_modules())
    acc = {k: torch.zeros_like(modules[k].weight) for k in names}
    for i in range(n):
        logits = model(ids[i:i + 1])
        ell = (example_normals(5, torch.tensor([i]), 3).to(logits.dtype) * logits).sum()
        for k, grad in zip(names, torch.autograd.grad(ell, [modules[k].weight for k in names])):
            acc[k] += grad ** 2
    for k in names:
        got = torch.as_tensor(run.results["change_rate"].arrays[f"{k}/grad_sq_mean"])
        want = acc[k] / n
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10, k


class _Shared(torch.nn.Module):
    """ALBERT's way: one Linear applied twice per forward (its per-example squares are not formed)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.shared, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(self.emb(ids))))).mean(1))


def test_a_layer_called_twice_costs_no_second_backward(monkeypatch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    ids, y = torch.randint(0, 20, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    run = probe_model(_Shared().eval(), TensorBundle(ids, y, 3, batch_size=4), ProbeOptions(probes=("change_rate",)))
    assert len(calls) == 2                                  # one backward per batch
    assert {l["name"] for l in run.results["change_rate"].figures["layers"]} == {"emb", "head"}
    assert "shared" in {s.name for s in run.skipped}
