"""r2 and drift (L2-SP §4.4, eq. 3): invariances and closed forms."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import SmallCNN, make_bundle
from ftdoctor.diagnose import ProbeOptions, probe_model
from ftdoctor.probes import r2 as r2_module


def test_r2_against_itself_is_one_and_drift_zero():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4).eval()
    ref = copy.deepcopy(model)
    bundle = make_bundle((3, 8, 8), n=32, num_classes=4)
    run = probe_model(model, bundle, ProbeOptions(probes=("r2", "drift")), reference=ref)
    rows = run.results["r2"].figures["layers"]
    assert [r["name"] for r in rows] == ["features.0", "features.3"]     # head excluded
    for r in rows:
        assert abs(r["median"] - 1) < 1e-12 and abs(r["min"] - 1) < 1e-12
        assert abs(r["identity_median"] - 1) < 1e-12
    assert run.results["drift"].figures["sp_penalty"] == 0.0


def test_r2_scale_invariant_identity_not():
    torch.manual_seed(0)
    ref = SmallCNN(num_classes=4).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.features[0].weight.mul_(2)
        model.features[0].bias.mul_(2)
    bundle = make_bundle((3, 8, 8), n=32, num_classes=4)
    rows = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"].figures["layers"]
    first = rows[0]
    assert abs(first["median"] - 1) < 1e-9
    # a = 2b: 1 - Σ(2b - b)² / Σ(b - mean b)² = 1 - Σb²/Σ(b - mean b)² < 0
    assert first["identity_median"] < 0.9


def test_r2_matches_numpy_corrcoef():
    torch.manual_seed(0)
    ref = SmallCNN(num_classes=4).eval()
    model = SmallCNN(num_classes=4).eval()
    bundle = make_bundle((3, 8, 8), n=32, num_classes=4)
    res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"]
    with torch.no_grad():
        a = model.features[0](bundle.x).transpose(0, 1).reshape(8, -1).double()
        b = ref.features[0](bundle.x).transpose(0, 1).reshape(8, -1).double()
    want = torch.stack([torch.corrcoef(torch.stack([a[c], b[c]]))[0, 1] ** 2 for c in range(8)])
    got = torch.as_tensor(res.arrays["features.0/r2"])
    assert torch.allclose(got, want, rtol=1e-6)   # per-batch sums of float32 activations in float32


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 128, 129])
def test_r2_quartiles_are_numpys(n):
    """The quartiles each layer's box reports equal np.percentile's (and the middle one np.median's)."""
    import numpy as np
    rows = np.random.default_rng(n).random((2, n))
    got = r2_module.quantiles(rows, (0.25, 0.5, 0.75))
    assert np.array_equal(got, np.percentile(rows, [25, 50, 75], axis=1))
    assert np.allclose(got[1], np.median(rows, axis=1), rtol=1e-15, atol=0)


def test_r2_of_same_shaped_layers_reduced_together_stay_apart():
    """Layers with outputs of one shape are reduced in one stack: each keeps its own figures."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(inplace=True),
                                   torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.Tanh(),
                                   torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.Flatten(),
                                   torch.nn.Linear(6 * 25, 4)).eval()

    ref, model = net(), net()
    bundle = make_bundle((3, 5, 5), n=20, num_classes=4, batch_size=8)
    res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"]
    a, b = bundle.x.double(), bundle.x.double()
    with torch.no_grad():
        for i in (0, 2, 4):
            a, b = model[i].double()(a), ref[i].double()(b)
            fa, fb = a.transpose(0, 1).reshape(6, -1), b.transpose(0, 1).reshape(6, -1)
            want = torch.stack([torch.corrcoef(torch.stack([fa[c], fb[c]]))[0, 1] ** 2 for c in range(6)])
            assert torch.allclose(torch.as_tensor(res.arrays[f"{i}/r2"]), want, rtol=1e-5), i
            a, b = model[i + 1](a), ref[i + 1](b)


def test_drift_closed_form_and_new_layers():
    torch.manual_seed(0)
    ref = SmallCNN(num_classes=10).eval()
    model = SmallCNN(num_classes=4).eval()
    model.features.load_state_dict(ref.features.state_dict())
    with torch.no_grad():
        model.features[3].weight.add_(0.5)
    bundle = make_bundle((3, 8, 8), n=16, num_classes=4)
    fig = probe_model(model, bundle, ProbeOptions(probes=("drift",)), reference=ref).results["drift"].figures
    assert fig["new"] == ["fc"]
    rows = {r["name"]: r for r in fig["layers"]}
    n = ref.features[3].weight.numel()
    assert rows["features.0"]["abs"] == 0.0
    assert math.isclose(rows["features.3"]["abs"], math.sqrt(0.25 * n), rel_tol=1e-6)
    assert math.isclose(rows["features.3"]["rel"], math.sqrt(0.25 * n) / ref.features[3].weight.norm().item(),
                        rel_tol=1e-6)
    assert math.isclose(fig["sp_penalty"], 0.25 * n, rel_tol=1e-6)  # float32 weights


@pytest.mark.parametrize("path", ["gram", "gram in chunks of one example", "stacked", "pair by pair"])
def test_r2_keeps_its_digits_when_a_channel_mean_dwarfs_its_spread(path, monkeypatch):
    # activations ~1e4 ± 1 over several batches: float32 sums of raw squares would lose the
    # variance entirely; the figures must still match float64 truth from the same activations,
    # by every way of reducing them (r2.shifted_sums)
    if path in ("stacked", "pair by pair"):
        monkeypatch.setattr(r2_module, "_GRAM_MIN_POSITIONS", 10**9)
        monkeypatch.setattr(r2_module, "_STACK_MAX_ELEMENTS", 1 if path == "pair by pair" else 10**9)
    elif path != "gram":
        monkeypatch.setattr(r2_module, "_GRAM_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    ref = SmallCNN(num_classes=4).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        ref.features[0].bias.add_(1e4)
        model.features[0].bias.add_(1e4 + 3.0)
        model.features[0].weight.mul_(1.5).add_(0.05 * torch.randn_like(model.features[0].weight))
    bundle = make_bundle((3, 8, 8), n=40, num_classes=4, batch_size=12)
    res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"]
    with torch.no_grad():
        a = model.features[0](bundle.x).transpose(0, 1).reshape(8, -1).double()
        b = ref.features[0](bundle.x).transpose(0, 1).reshape(8, -1).double()
    want = torch.stack([torch.corrcoef(torch.stack([a[c], b[c]]))[0, 1] ** 2 for c in range(8)])
    ident = 1 - ((a - b) ** 2).sum(1) / ((b - b.mean(1, keepdim=True)) ** 2).sum(1)
    assert torch.allclose(torch.as_tensor(res.arrays["features.0/r2"]), want, rtol=1e-6)
    assert torch.allclose(torch.as_tensor(res.arrays["features.0/r2_identity"]), ident, rtol=1e-6)


class _Tokens(torch.nn.Module):
    """Linear layers on (batch, tokens, features): R² over channels-last outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(torch.relu(self.embed(x)))).mean(1))


@pytest.mark.parametrize("path", ["stacked", "pair by pair"])
def test_r2_of_token_outputs_matches_float64_truth(path, monkeypatch):
    # channels-last outputs of Linear layers, pooled over examples and tokens, with a mean that
    # dwarfs the spread: both ways of reducing them give the float64 figures
    monkeypatch.setattr(r2_module, "_STACK_MAX_ELEMENTS", 1 if path == "pair by pair" else 10**9)
    torch.manual_seed(0)
    ref = _Tokens().eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        ref.embed.bias.add_(1e3)
        model.embed.bias.add_(1e3 + 2.0)
        model.mix.weight.add_(0.3 * torch.randn_like(model.mix.weight))
    bundle = make_bundle((5, 6), n=36, num_classes=4, batch_size=10)
    res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"]
    for name in ("embed", "mix"):
        with torch.no_grad():
            a = getattr(model, name)(model.embed(bundle.x).relu() if name == "mix" else bundle.x)
            b = getattr(ref, name)(ref.embed(bundle.x).relu() if name == "mix" else bundle.x)
        a, b = a.reshape(-1, 8).T.double(), b.reshape(-1, 8).T.double()
        want = torch.stack([torch.corrcoef(torch.stack([a[c], b[c]]))[0, 1] ** 2 for c in range(8)])
        ident = 1 - ((a - b) ** 2).sum(1) / ((b - b.mean(1, keepdim=True)) ** 2).sum(1)
        assert torch.allclose(torch.as_tensor(res.arrays[f"{name}/r2"]), want, rtol=1e-6), name
        assert torch.allclose(torch.as_tensor(res.arrays[f"{name}/r2_identity"]), ident, rtol=1e-6), name


class _ChangesInPlaceSometimes(torch.nn.Module):
    """Doubles its conv's output in place, but only for a batch holding a marked example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h = self.conv(x)
        if bool((x[:, 0, 0, 0] > 50).any()):
            h.mul_(2.0)
        return self.head(h.relu().mean((2, 3)))


@pytest.mark.parametrize("marked", [None, 3, 20])
def test_r2_sees_outputs_as_the_layer_made_them_even_when_changed_in_place_later(marked):
    # outputs are kept without a copy unless a later op changes them in place: the first batch finds
    # such layers (copied from then on); a change first seen on a later batch runs that forward again
    torch.manual_seed(0)
    ref = _ChangesInPlaceSometimes().eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.conv.weight.add_(0.2 * torch.randn_like(model.conv.weight))
    bundle = make_bundle((3, 6, 6), n=40, num_classes=3, batch_size=16)
    if marked is not None:
        bundle.x[marked, 0, 0, 0] = 100.0
    before = model.forwards
    res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=ref).results["r2"]
    with torch.no_grad():
        a = model.conv(bundle.x).transpose(0, 1).reshape(4, -1).double()
        b = ref.conv(bundle.x).transpose(0, 1).reshape(4, -1).double()
    want = torch.stack([torch.corrcoef(torch.stack([a[c], b[c]]))[0, 1] ** 2 for c in range(4)])
    ident = 1 - ((a - b) ** 2).sum(1) / ((b - b.mean(1, keepdim=True)) ** 2).sum(1)
    assert torch.allclose(torch.as_tensor(res.arrays["conv/r2"]), want, rtol=1e-6)
    assert torch.allclose(torch.as_tensor(res.arrays["conv/r2_identity"]), ident, rtol=1e-6)
    # the first batch copies everything; a change first seen in the second batch costs one forward more
    marked_forwards, before = model.forwards - before, model.forwards
    probe_model(model, make_bundle((3, 6, 6), n=40, num_classes=3, batch_size=16), ProbeOptions(probes=("r2",)),
                reference=ref)
    assert marked_forwards - (model.forwards - before) == (1 if marked == 20 else 0)


def test_r2_merge_of_two_processes_equals_one_pass():
    # each process shifts by its own first batch's means: merging must unshift both first
    from ftdoctor.diagnose import find_head, reference_pairs
    from ftdoctor.engine import PassSettings, run_pass
    from ftdoctor.model import layer_order
    from ftdoctor.probes.base import ProbeContext
    from ftdoctor.probes.r2 import R2Probe

    torch.manual_seed(0)
    ref = SmallCNN(num_classes=4).eval()
    model = SmallCNN(num_classes=4).eval()
    bundle = make_bundle((3, 8, 8), n=40, num_classes=4)
    layers, _ = layer_order(model, bundle.x[:1])
    head = find_head(list(layers), None)
    ctx = ProbeContext(model=model, layers=tuple(layers), head=head, num_classes=4, seed=0, reference=ref,
                       reference_layers=tuple(reference_pairs(layers, ref)))

    def fed(lo, hi):
        probe = R2Probe(ctx)
        batches = [(bundle.x[i:i + 8], bundle.y[i:i + 8], torch.arange(i, i + 8), 8) for i in range(lo, hi, 8)]
        run_pass(model, batches, [probe], layers, head, 4, PassSettings(), reference=ref,
                 reference_pairs=ctx.reference_layers)
        return probe

    whole, first, second = fed(0, 40), fed(0, 16), fed(16, 40)
    first.merge_(second)
    for name in ("features.0", "features.3"):
        assert torch.allclose(torch.as_tensor(first.compute().arrays[f"{name}/r2"]),
                              torch.as_tensor(whole.compute().arrays[f"{name}/r2"]), rtol=1e-6)


def _last_call_outputs(net, layer, x):
    """The last call's output of ``layer`` in ``net``'s forward (what r2 compares)."""
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[-1]


def _corr2(a, b):
    fa, fb = a.transpose(0, 1).reshape(a.shape[1], -1).double(), b.transpose(0, 1).reshape(b.shape[1], -1).double()
    return torch.stack([torch.corrcoef(torch.stack([fa[c], fb[c]]))[0, 1] ** 2 for c in range(fa.shape[0])])


class Twice(torch.nn.Module):
    """A convolution applied twice per forward, and one the reference may share with the model."""

    def __init__(self, c=4):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.d = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, c)

    def forward(self, x):
        return self.fc(torch.relu(self.d(torch.tanh(self.c(torch.tanh(self.c(x)))))).mean((2, 3)))


@pytest.mark.parametrize("overlap", [False, True])
def test_r2_with_a_layer_called_twice_and_a_shared_module(overlap, monkeypatch):
    # every batch after the first reduces large maps in the reference's hooks: a layer called twice
    # still compares its last calls, and a module the reference shares with the model is not
    # confused with the model's own output
    from ftdoctor.engine import reference as capture, stream
    monkeypatch.setattr(stream, "overlap_allowed", lambda *a: overlap)
    monkeypatch.setattr(capture, "_OVERLAP_SPARE_CORES", -1e9)
    torch.manual_seed(0)
    model, ref = Twice().eval(), Twice().eval()
    shared = copy.deepcopy(ref)
    shared.d = model.d                                      # shares a module: overlap is refused anyway
    bundle = make_bundle((3, 8, 8), n=40, num_classes=4, batch_size=8)
    for reference in (ref, shared):
        res = probe_model(model, bundle, ProbeOptions(probes=("r2",)), reference=reference).results["r2"]
        for name in ("c", "d"):
            want = _corr2(_last_call_outputs(model, getattr(model, name), bundle.x),
                          _last_call_outputs(reference, getattr(reference, name), bundle.x))
            assert torch.allclose(torch.as_tensor(res.arrays[f"{name}/r2"]), want, rtol=1e-5), (name, reference)
