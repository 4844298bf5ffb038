"""change_rate against brute force: a loop over single examples with autograd (Krähenbühl et al. §3)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import SmallCNN, make_bundle
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.model import forward_order
from ftdoctor.rng import example_normals


class SeqLinear(nn.Module):
    """Linear layers on (B, T, F) tokens, then on (B, F): both ranks of input."""

    def __init__(self, c=4):
        super().__init__()
        self.tok = nn.Linear(6, 7)
        self.fc = nn.Linear(7, c)

    def forward(self, x):
        return self.fc(torch.tanh(self.tok(x)).mean(1))


class Conv1dNet(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(6, c)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(-1))


class NoBackwardPastHere(torch.autograd.Function):
    """Identity whose backward fails: the random-loss pass must not differentiate below the first layer."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("the input's gradient was formed")


class Graphs(nn.Module):
    """Where the random loss's backward may stop (engine: the root layers' outputs): the input
    normalised inside forward then guarded by :class:`NoBackwardPastHere`, two stems on it (one
    followed by an in-place ReLU), an input-side BatchNorm before the second stem, and a layer fed
    both by an affine layer and straight from the (pooled) input."""

    def __init__(self, c=4):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1))
        self.stem_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.stem_b = nn.Conv2d(3, 4, 1)
        self.mix = nn.Linear(4 + 3, 6)
        self.fc = nn.Linear(6, c)

    def forward(self, x):
        x = NoBackwardPastHere.apply((x - self.mean) * 2.0)
        a = torch.relu_(self.stem_a(x))
        b = self.stem_b(self.bn(x))
        pooled = torch.cat([(a + b).mean((2, 3)), x.mean((2, 3))], 1)
        return self.fc(torch.tanh(self.mix(pooled)))


def brute_force_g2(model, bundle, seed, loss="random"):
    """Mean over examples of the squared per-example weight gradient, one example at a time."""
    layers = forward_order(model, bundle.x[:1])
    acc = {l.name: torch.zeros_like(l.weight, dtype=torch.float64) for l in layers}
    model.eval()
    for n in range(bundle.num_samples):
        logits = model(bundle.x[n:n + 1])
        if loss == "random":
            eta = example_normals(seed, torch.tensor([n]), logits.shape[1]).to(logits.dtype)
            ell = (eta * logits).sum()
        else:
            ell = F.cross_entropy(logits, bundle.y[n:n + 1])
        grads = torch.autograd.grad(ell, [l.weight for l in layers])
        for l, g in zip(layers, grads):
            acc[l.name] += g.double() ** 2
    return {k: v / bundle.num_samples for k, v in acc.items()}


def ours(model, bundle, **kw):
    run = probe_model(model, bundle, ProbeOptions(probes=("change_rate",), **kw))
    return run.results["change_rate"]


CASES = [
    ("linear 2-D and 3-D", SeqLinear, (5, 6)),
    ("conv1d stride/pad/dilation", Conv1dNet, (3, 11)),
    ("conv2d stride/pad/dilation/groups", lambda: SmallCNN(num_classes=4), (3, 8, 8)),
    ("two stems, in-place, input skip", Graphs, (3, 5, 5)),
]


@pytest.mark.parametrize("label,factory,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("loss", ["random", "ce"])
def test_exact_matches_per_example_loop(label, factory, shape, loss):
    torch.manual_seed(0)
    model = factory().double()
    bundle = make_bundle(shape, n=24, num_classes=4, batch_size=10)
    bundle.x = bundle.x.double()
    truth = brute_force_g2(model, bundle, seed=3, loss=loss)
    res = ours(model, bundle, seed=3, change_rate_loss=loss)
    for name, g2 in truth.items():
        got = torch.as_tensor(res.arrays[f"{name}/grad_sq_mean"])
        rel = ((got - g2).abs().max() / g2.abs().max()).item()
        assert rel < 1e-5, (name, rel)
    # the summary figures follow from G² as SPEC §1.2 defines them
    layers = {l["name"]: l for l in res.figures["layers"]}
    for name, g2 in truth.items():
        w2 = (dict(model.named_modules())[name].weight.detach().double() ** 2).mean()
        assert math.isclose(layers[name]["change_rate"], math.sqrt(g2.mean() / w2), rel_tol=1e-5)
        c = (g2 / w2).sqrt().flatten()
        assert math.isclose(layers[name]["cv"], (c.std(unbiased=False) / c.mean()).item(), rel_tol=1e-5)
        # SPEC §1.2: c_{k,j} = sqrt(mean over outputs and positions of G²_{k,·,j,·} / mean(W²))
        cols = torch.stack([(g2[:, j].mean() / w2).sqrt() for j in range(g2.shape[1])])
        assert math.isclose(layers[name]["column_cv"], (cols.std(unbiased=False) / cols.mean()).item(),
                            rel_tol=1e-5)
    rates = [l["change_rate"] for l in res.figures["layers"]]
    assert math.isclose(res.figures["spread"], max(rates) / min(rates), rel_tol=1e-12)


def test_figures_do_not_depend_on_batch_size_or_order():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4).double()
    bundle = make_bundle((3, 8, 8), n=20, num_classes=4, batch_size=20)
    bundle.x = bundle.x.double()
    a = ours(model, bundle, seed=1).figures
    bundle.batch_size = 3
    b = ours(model, bundle, seed=1).figures
    for la, lb in zip(a["layers"], b["layers"]):
        assert math.isclose(la["change_rate"], lb["change_rate"], rel_tol=1e-9)


def test_batch_mode_agrees_with_exact_statistically():
    """Batch mode is unbiased for the same G²: over 64 batches of 8 the layer rates agree within 10%.

    The tolerance: each layer's rate averages thousands of weights over 64 independent batch
    estimates, whose cross terms have mean 0; measured deviations are a few per cent.
    """
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    bundle = make_bundle((3, 8, 8), n=512, num_classes=4, batch_size=8)
    exact = ours(model, bundle, seed=0).figures["layers"]
    batch = ours(model, bundle, seed=0, change_rate_mode="batch").figures["layers"]
    for e, b in zip(exact, batch):
        assert abs(b["change_rate"] / e["change_rate"] - 1) < 0.10, (e, b)


def test_batch_mode_with_ce_is_refused():
    from ftdoctor.errors import FtdoctorError
    with pytest.raises(FtdoctorError, match="cross terms"):
        ProbeOptions(change_rate_mode="batch", change_rate_loss="ce").validate(False)


class KeywordStem(nn.Module):
    """A stem called with its input as a keyword (hooks see no positional input, so it is skipped),
    a layer after it, and a side layer on the input: the layer after the stem is still measured."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.after = nn.Conv2d(4, 4, 3, padding=1)
        self.side = nn.Linear(3, 4)
        self.fc = nn.Linear(4, c)

    def forward(self, x):
        feat = torch.tanh(self.after(torch.tanh(self.stem(input=x)))).mean((2, 3))
        return self.fc(feat + self.side(x.mean((2, 3))))


def test_layers_after_a_keyword_called_stem_are_measured():
    torch.manual_seed(0)
    model = KeywordStem().double()
    bundle = make_bundle((3, 5, 5), n=16, num_classes=4, batch_size=6)
    bundle.x = bundle.x.double()
    truth = brute_force_g2(model, bundle, seed=1)
    res = ours(model, bundle, seed=1)
    for name in ("after", "side", "fc"):
        got = torch.as_tensor(res.arrays[f"{name}/grad_sq_mean"])
        assert ((got - truth[name]).abs().max() / truth[name].abs().max()).item() < 1e-5, name


class NormNet(nn.Module):
    """An embedding (of tokens read off the image, padding included), a LayerNorm over it, a conv with a
    GroupNorm: the layers beyond BackPACK that the engine measures too."""

    def __init__(self, c=4):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(10, c)
        with torch.no_grad():
            for norm in (self.ln, self.gn):
                norm.weight.normal_()
                norm.bias.normal_()

    def forward(self, x):
        ids = (x[:, 0, 0, :].abs() * 10).long() % 13
        t = self.ln(self.emb(ids)).mean(1)
        h = torch.relu(self.gn(self.conv(x))).mean((2, 3))
        return self.fc(torch.cat([t, h], 1))


@pytest.mark.parametrize("loss", ["random", "ce"])
def test_embeddings_and_norm_layers_match_a_per_example_loop(loss):
    from ftdoctor.model import measured_layers

    torch.manual_seed(0)
    model = NormNet().double().eval()
    bundle = make_bundle((3, 5, 5), n=20, num_classes=4, batch_size=8)
    bundle.x = bundle.x.double()
    layers = measured_layers(model, forward_order(model, bundle.x[:1]), bundle.x[:1])
    assert [l.name for l in layers] == ["emb", "ln", "conv", "gn", "fc"]
    acc = {l.name: torch.zeros_like(l.weight, dtype=torch.float64) for l in layers}
    for n in range(bundle.num_samples):
        logits = model(bundle.x[n:n + 1])
        if loss == "random":
            ell = (example_normals(3, torch.tensor([n]), logits.shape[1]).to(logits.dtype) * logits).sum()
        else:
            ell = F.cross_entropy(logits, bundle.y[n:n + 1])
        for l, g in zip(layers, torch.autograd.grad(ell, [l.weight for l in layers])):
            acc[l.name] += g.double() ** 2
    res = ours(model, bundle, seed=3, change_rate_loss=loss)
    for name, total in acc.items():
        g2 = total / bundle.num_samples
        got = torch.as_tensor(res.arrays[f"{name}/grad_sq_mean"])
        assert ((got - g2).abs().max() / g2.abs().max()).item() < 1e-5, name
    rows = {l["name"]: l for l in res.figures["layers"]}
    assert (rows["emb"]["role"], rows["ln"]["role"], rows["gn"]["role"]) == ("embedding", "norm", "norm")
    counted = [rows[n]["change_rate"] for n in ("emb", "conv", "fc")]    # norms reported, not in the spread
    assert math.isclose(res.figures["spread"], max(counted) / min(counted), rel_tol=1e-12)
