"""trace / compare: the recorded series, pairing of methods, and what each method must do to the weights."""
from __future__ import annotations

import copy
import json
import math

import h5py
import numpy as np
import pytest
import torch

from ftdoctor.dynamics import (METHODS, SCHEMA, CompareResult, RunSeries, TraceOptions, TraceResult,
                               batch_noise_fraction, batch_plan, check_paired, compare_model, feature_variance,
                               summarise, trace_model, write_hdf5)
from ftdoctor.errors import FtdoctorError
from ftdoctor.heads import init_head_tensors, generator_for
from ftdoctor.stats import paired_t_test

from helpers import SmallCNN, make_bundle

SHAPE = (3, 16, 16)
LAYERS = ("features.0", "features.3", "fc")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=7).eval()          # "pretrained" on 7 classes; the target task has 5
    train = make_bundle(SHAPE, n=48, num_classes=5, seed=0)
    test = make_bundle(SHAPE, n=24, num_classes=5, seed=1)
    return model, train, test


def _opts(**kw) -> TraceOptions:
    base = dict(steps=6, batch_size=8, window=3, eval_every=4, lr=1e-3)
    base.update(kw)
    return TraceOptions(**base)


def _backbone(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


# -- series -------------------------------------------------------------------------------------
def test_trace_series_shapes_and_eval_points(setup):
    model, train, test = setup
    run, tuned = trace_model(model, train, test, _opts(steps=9, window=3, eval_every=4))
    assert run.layers == LAYERS and run.head == "fc"
    assert run.step.tolist() == list(range(1, 10))
    assert run.grad_norm.shape == (9, 3)
    # before training, after each of the first 3 steps, every 4 steps, and at the end
    assert run.eval_step.tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert tuned.fc.out_features == 5 and model.fc.out_features == 7     # template untouched
    for name in ("loss", "train_acc", "lr", "feature_var", "noise_fraction", "sp_penalty"):
        assert np.isfinite(getattr(run, name)).all(), name
    assert run.final_acc == run.eval_acc[-1]
    assert run.early_acc(3) == pytest.approx(np.mean(run.eval_acc[1:4]))


def test_first_step_series_match_a_brute_force_forward(setup):
    """Step 1's loss, accuracy, head-input variance, noise fraction and gradient norms, recomputed by hand."""
    model, train, test = setup
    opts = _opts(steps=1)
    run, _ = trace_model(model, train, test, opts)
    idx = batch_plan(train.num_samples, 1, opts.batch_size, opts.seed)[0]
    x, y = train.x[idx], train.y[idx]
    m = copy.deepcopy(model)
    m.fc = torch.nn.Linear(32, 5)
    w, b = init_head_tensors(m.fc.weight.shape, True, "kaiming", generator_for(opts.seed))
    with torch.no_grad():
        m.fc.weight.copy_(w)
        m.fc.bias.copy_(b)
    m.train()
    feats = m.features(x)
    logits = m.fc(feats)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    assert run.loss[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert run.train_acc[0] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    f = feats.detach().double()
    assert run.feature_var[0] == pytest.approx(float(((f - f.mean(0)) ** 2).mean(0).mean()), rel=1e-9)
    p = torch.softmax(logits.detach().double(), 1)
    zeta = float((p ** 2).sum(1).mean())
    kappa = float(p[torch.arange(len(y)), y].mean())
    assert run.noise_fraction[0] == pytest.approx(zeta / (zeta + 1 - 2 * kappa), rel=1e-9)
    expect = [float(m.features[0].weight.grad.norm()), float(m.features[3].weight.grad.norm()),
              float(m.fc.weight.grad.norm())]
    assert run.grad_norm[0] == pytest.approx(expect, rel=1e-5)
    assert run.lr[0] == run.backbone_lr[0] == 1e-3


def test_noise_fraction_floor_and_variance_helpers():
    logits = torch.zeros(10, 4)                      # uniform ŷ: ζ = 1/C, φ = 1/C + 1 − 2/C
    y = torch.arange(10) % 4
    assert batch_noise_fraction(logits, y) == pytest.approx(1 / 3)          # the floor 1/(C−1)
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert feature_variance(f) == pytest.approx(0.5)                        # (1 + 0) / 2


def test_entame_starts_at_max_entropy_loss(setup):
    model, train, test = setup
    for method in ("entame", "entame-fn"):
        run, _ = trace_model(model, train, test, _opts(method=method, steps=2))
        assert run.loss[0] == pytest.approx(math.log(5), abs=1e-4), method
        assert run.noise_fraction[0] == pytest.approx(1 / 4, abs=1e-4), method
        # eq. 8: the error reaching the backbone passes through W ~ 1e-6, so backbone gradients vanish
        assert run.grad_norm[0, 0] < 1e-4 * run.grad_norm[0, 2]
    base, _ = trace_model(model, train, test, _opts(steps=2))
    assert base.noise_fraction[0] > 0.26


# -- what each method does to the weights --------------------------------------------------------
def test_warmup_leaves_the_backbone_bit_identical_during_warmup(setup):
    model, train, test = setup
    run, tuned = trace_model(model, train, test, _opts(method="warmup", warmup_steps=3, steps=3))
    for k, v in _backbone(model).items():
        assert torch.equal(tuned.state_dict()[k], v), k
    assert run.backbone_lr.tolist() == [0.0, 0.0, 0.0]
    assert (run.grad_norm[:, 0] > 0).all()            # the gradient is measured, just not applied
    head0 = init_head_tensors((5, 32), True, "kaiming", generator_for(0))[0]
    assert not torch.equal(tuned.fc.weight.detach(), head0)      # the head did learn
    run4, tuned4 = trace_model(model, train, test, _opts(method="warmup", warmup_steps=3, steps=4))
    assert not torch.equal(tuned4.features[0].weight, model.features[0].weight)
    assert run4.backbone_lr.tolist() == [0.0, 0.0, 0.0, 1e-3]


def test_l2sp_keeps_the_backbone_closer_than_base(setup):
    model, train, test = setup
    opts = dict(steps=12, optimizer="sgd", lr=0.05, alpha=2.0)
    base, tuned_base = trace_model(model, train, test, _opts(method="base", **opts))
    l2sp, tuned_l2sp = trace_model(model, train, test, _opts(method="l2sp", **opts))
    assert base.batch_digest == l2sp.batch_digest and base.start_digest == l2sp.start_digest

    def drift(tuned):                                 # Σ_k ‖W_k − W⁰_k‖² over the backbone's affine weights
        return sum(float(((tuned.features[i].weight - model.features[i].weight).detach() ** 2).sum())
                   for i in (0, 3))
    assert base.sp_penalty[-1] == pytest.approx(drift(tuned_base), rel=1e-5)
    assert l2sp.sp_penalty[-1] == pytest.approx(drift(tuned_l2sp), rel=1e-5)
    assert l2sp.sp_penalty[-1] < 0.8 * base.sp_penalty[-1]
    # step 1 is the same forward for both (same head, backbone, batch): the penalty is still zero there
    assert l2sp.loss[0] == base.loss[0]


def test_rifle_reinitialises_the_head_exactly_at_period_boundaries(setup, monkeypatch):
    from ftdoctor import train as train_mod
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    original = train_mod.RifleSchedule.step

    def spy(self, step):
        did = original(self, step)
        seen[step] = (did, self.head.weight.detach().clone(), self)
        return did
    monkeypatch.setattr(train_mod.RifleSchedule, "step", spy)
    model, train, test = setup
    run, _ = trace_model(model, train, test, _opts(method="rifle", steps=10, rifle_period=4, seed=3))
    assert run.reinitialised == (4, 8)
    for t, (did, w, sched) in seen.items():
        assert did == (t in (4, 8))
        if did:
            assert torch.equal(w, sched.fresh_head(t // 4)[0])
    assert run.lr.tolist() == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * (t % 4) / 4)) for t in range(10)])
    assert run.backbone_lr.tolist() == [1e-3] * 10


# -- compare ------------------------------------------------------------------------------------
def test_compare_pairs_methods_by_seed(setup):
    model, train, test = setup
    rows, runs = compare_model(model, train, test, _opts(steps=3), METHODS, seeds=2)
    assert len(runs) == 12
    for s in (0, 1):
        rs = [r for r in runs if r.seed == s]
        assert len({r.start_digest for r in rs}) == 1 and len({r.batch_digest for r in rs}) == 1
        # independent of the digests: step 1's head input depends only on the backbone and the batch
        assert len({float(r.feature_var[0]) for r in rs}) == 1
        # base, warmup and l2sp share the He head too, so their first loss is identical
        assert len({float(r.loss[0]) for r in rs if r.method in ("base", "warmup", "l2sp")}) == 1
    assert runs[0].batch_digest != [r for r in runs if r.seed == 1][0].batch_digest
    assert [m.name for m in rows] == list(METHODS)


def test_compare_is_deterministic(setup):
    model, train, test = setup
    _, a = compare_model(model, train, test, _opts(steps=4), ("base", "entame"), seeds=2)
    _, b = compare_model(model, train, test, _opts(steps=4), ("base", "entame"), seeds=2)
    for ra, rb in zip(a, b):
        for key, arr in ra.arrays().items():
            assert np.array_equal(arr, rb.arrays()[key], equal_nan=True), key


def test_check_paired_refuses_mismatched_runs(setup):
    model, train, test = setup
    _, runs = compare_model(model, train, test, _opts(steps=2), ("base", "entame"), seeds=1)
    bad = [runs[0], RunSeries(**{**runs[1].__dict__, "batch_digest": "0" * 64})]
    with pytest.raises(FtdoctorError, match="identical"):
        check_paired(bad)


def _fake_run(method: str, seed: int, accs: list[float]) -> RunSeries:
    n = len(accs) - 1
    z = np.zeros(n)
    return RunSeries(method, seed, "fc", ("fc",), np.arange(1, n + 1), z, z, z, z, z, z, z, np.zeros((n, 1)),
                     np.arange(n + 1), np.asarray(accs, float), "s", "b")


def test_summary_is_the_entame_table3_view():
    runs = [_fake_run("base", 0, [0.1, 0.2, 0.3, 0.4, 0.9]), _fake_run("base", 1, [0.1, 0.3, 0.3, 0.3, 0.8]),
            _fake_run("base", 2, [0.1, 0.1, 0.2, 0.3, 0.7]),
            _fake_run("entame", 0, [0.1, 0.4, 0.5, 0.6, 0.9]), _fake_run("entame", 1, [0.1, 0.5, 0.6, 0.7, 0.9]),
            _fake_run("entame", 2, [0.1, 0.3, 0.3, 0.3, 0.8])]
    base, ent = summarise(runs, ("base", "entame"), window=3)
    assert base.diff_vs_first is None and base.p_value is None
    assert base.early_acc == pytest.approx((0.3, 0.3, 0.2))            # steps 1–3, not step 0, not step 4
    assert ent.early_acc == pytest.approx((0.5, 0.6, 0.3))
    assert ent.diff_vs_first == pytest.approx(0.2)
    # paired t on diffs (0.2, 0.3, 0.1): t = 0.2 / (0.1/√3) = 3.4641, df 2, two-sided p = 0.0742
    assert ent.p_value == pytest.approx(0.07418, abs=2e-4)
    assert ent.diff_ci95 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert ent.final_acc_mean == pytest.approx((0.9 + 0.9 + 0.8) / 3)
    assert (ent.diff_vs_first, ent.diff_ci95, ent.p_value) == pytest.approx(
        paired_t_test(ent.early_acc, base.early_acc))


def test_options_are_validated():
    with pytest.raises(FtdoctorError):
        TraceOptions(method="sgdr").validate()
    with pytest.raises(FtdoctorError):
        TraceOptions(steps=0).validate()
    with pytest.raises(FtdoctorError):
        TraceOptions(optimizer="lbfgs").validate()
    assert TraceOptions(steps=10).period == 3 and TraceOptions(steps=10, rifle_period=7).period == 7


# -- HDF5 layout (SPEC §3) ----------------------------------------------------------------------
def test_compare_hdf5_layout(setup, tmp_path):
    model, train, test = setup
    opts = _opts(steps=5)
    rows, runs = compare_model(model, train, test, opts, ("base", "rifle"), seeds=2)
    res = CompareResult({"path": "m.pt"}, {"name": "t", "num_classes": 5, "eval_split": "test",
                                           "eval_samples": 24}, {"methods": ["base", "rifle"]}, 3, 5, (0, 1),
                        rows, runs)
    path = tmp_path / "c.h5"
    write_hdf5(path, res)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == SCHEMA
        doc = json.loads(f.attrs["report"])
        assert doc["schema"] == "ftdoctor.compare/1"
        assert set(doc) >= {"window", "steps", "seeds", "methods"}
        assert doc["seeds"] == 2 and doc["window"] == 3 and doc["steps"] == 5
        first = doc["methods"][0]
        assert set(first) == {"name", "early_acc_mean", "early_acc_ci95", "final_acc_mean", "final_acc_ci95",
                              "diff_vs_first", "diff_ci95", "p_value"}
        assert first["diff_vs_first"] is None and first["p_value"] is None
        assert 0 <= doc["methods"][1]["final_acc_mean"] <= 1
        assert sorted(f["runs"]) == ["base", "rifle"]
        for m in ("base", "rifle"):
            assert sorted(f[f"runs/{m}"]) == ["seed_0", "seed_1"]
            g = f[f"runs/{m}/seed_0"]
            for series in ("step", "loss", "train_acc", "lr", "eval_step", "eval_acc", "feature_var",
                           "noise_fraction", "grad_norm"):
                assert series in g, series
            assert g["grad_norm"].shape == (5, 3)
            assert [s.decode() if isinstance(s, bytes) else s for s in g["grad_norm"].attrs["layers"]] == \
                list(LAYERS)
            assert g["loss"].shape == (5,)
            assert g["eval_step"][()].tolist() == [0, 1, 2, 3, 4, 5]
        assert list(f["runs/rifle/seed_0/step"].attrs["reinitialised"]) == [2, 4]


def test_trace_json_has_final_figures(setup):
    model, train, test = setup
    run, _ = trace_model(model, train, test, _opts())
    res = TraceResult({"path": "m.pt"}, {"name": "t"}, {"window": 3, **_opts().settings()}, run)
    doc = res.to_json()
    assert doc["schema"] == SCHEMA and doc["method"] == "base" and doc["steps"] == 6
    assert doc["final"]["eval_acc"] == run.final_acc
    assert [g["name"] for g in doc["final"]["grad_norm"]] == list(LAYERS)
    json.dumps(doc, allow_nan=False)


# -- the command line and the library calls on a real checkpoint ---------------------------------
ARCH = ["--arch", "ftdoctor.zoo:ShapesNet"]
DATA = ["--data", "shapes:5", "--max-samples", "64", "--eval-samples", "32", "--batch-size", "16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from ftdoctor.zoo import ShapesNet
    d = tmp_path_factory.mktemp("dyn")
    torch.manual_seed(0)
    torch.save(ShapesNet(num_classes=10).state_dict(), d / "src.pt")
    return d / "src.pt"


def run_cli(*args, capsys, cwd):
    import os
    from helpers import run_cli as run
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        return tuple(run(*args))
    finally:
        os.chdir(old_cwd)


def _arch_opts():
    from ftdoctor.checkpoint import ModelOptions
    return ModelOptions(arch="ftdoctor.zoo:ShapesNet")


def test_cli_trace_writes_json_hdf5_and_checkpoint(ckpt, tmp_path, capsys):
    code, out, err = run_cli("trace", ckpt, *ARCH, *DATA, "--method", "rifle", "--steps", "4", "--rifle-period",
                             "2", "-o", tmp_path / "t.h5", "--save", tmp_path / "tuned.pt", "--format", "json",
                             "--quiet", capsys=capsys, cwd=tmp_path)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == SCHEMA and doc["method"] == "rifle" and doc["steps"] == 4
    assert doc["final"]["reinitialised"] == [2]
    assert doc["data"]["num_classes"] == 5 and doc["model"]["head"] == "classifier.2"
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f.attrs["schema"] == SCHEMA
        assert f["runs/rifle/seed_0/grad_norm"].shape == (4, 6)
    side = json.loads((tmp_path / "tuned.pt.ftdoctor.json").read_text())
    assert side["method"] == "rifle" and side["input"]["sha256"] == doc["model"]["sha256"]
    state = torch.load(tmp_path / "tuned.pt", weights_only=True)
    assert state["classifier.2.weight"].shape == (5, 64)


@pytest.mark.parametrize("method", ["entame-fn", "l2sp"])
def test_saved_checkpoint_reproduces_the_final_accuracy(ckpt, tmp_path, method):
    """Round trip: the checkpoint --save writes, reloaded, scores the run's final eval accuracy exactly."""
    from ftdoctor.checkpoint import load_model
    from ftdoctor.data import DataOptions, load_data
    from ftdoctor.dynamics import Examples, accuracy, trace
    data = DataOptions(data="shapes:5", max_samples=64)
    res = trace(ckpt, model=_arch_opts(), data=data, options=TraceOptions(method=method, steps=3, batch_size=16),
                eval_samples=32, save=tmp_path / "ft.pt")
    loaded = load_model(tmp_path / "ft.pt", _arch_opts())
    test = load_data(DataOptions(data="shapes:5", split="test", max_samples=32))
    assert accuracy(loaded.model, Examples(test, torch.device("cpu"))) == res.run.final_acc
    if method == "entame-fn":
        assert "classifier.2.feature_norm.mean" in torch.load(tmp_path / "ft.pt", weights_only=True)


def test_cli_compare_json_and_determinism(ckpt, tmp_path, capsys):
    args = ("compare", ckpt, *ARCH, *DATA, "--methods", "base,entame", "--seeds", "2", "--steps", "3",
            "--window", "2", "--format", "json", "--quiet")
    code, out, err = run_cli(*args, "-o", tmp_path / "a.h5", capsys=capsys, cwd=tmp_path)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "ftdoctor.compare/1" and doc["seeds"] == 2 and doc["window"] == 2
    assert [m["name"] for m in doc["methods"]] == ["base", "entame"]
    assert doc["methods"][0]["p_value"] is None and 0 <= doc["methods"][1]["p_value"] <= 1
    code, out2, err = run_cli(*args, "-o", tmp_path / "b.h5", capsys=capsys, cwd=tmp_path)
    assert code == 0 and out2 == out
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        for m in ("base", "entame"):
            for s in ("seed_0", "seed_1"):
                for k in a[f"runs/{m}/{s}"]:
                    assert np.array_equal(a[f"runs/{m}/{s}/{k}"][()], b[f"runs/{m}/{s}/{k}"][()],
                                          equal_nan=True), (m, s, k)


@pytest.mark.parametrize("extra", [
    ["trace", "--method", "sgdr"],
    ["compare", "--methods", "base,nope"],
    ["compare", "--methods", "base,base"],
    ["trace", "--save", "SRC"],
    ["trace", "-o", "missing/dir/t.h5"],
    ["trace", "--phi-w", "1e-6", "--lam", "10"],
    ["trace", "--data", "shapes:5", "--eval-split", "test", "--window", "0"],
])
def test_cli_bad_input_is_exit_2_and_writes_nothing(ckpt, tmp_path, capsys, extra):
    cmd, *rest = extra
    rest = [str(ckpt) if r == "SRC" else r for r in rest]
    before = set(tmp_path.iterdir())
    code, out, err = run_cli(cmd, ckpt, *ARCH, *DATA, "--steps", "2", "--quiet", *rest, capsys=capsys, cwd=tmp_path)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before
