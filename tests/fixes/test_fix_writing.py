"""Every format out as it came in, the sidecar, and the writing rules (SPEC §2, §8): never destructive."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixhelp import data_flags, make_data
from helpers import run_cli
from ftdoctor.featurenorm import FeatureNormLinear, attach_feature_norms

ARCH = ["--arch", "ftd_fixnets:Small"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def setup(nets, tmp_path):
    torch.manual_seed(0)
    model = nets.Small(num_classes=5).eval()
    make_data(tmp_path / "d.npz", n=32)
    return model, data_flags(tmp_path / "d.npz", n=32)


def _fix(src, out, flags, *extra):
    code, stdout, err = run_cli("fix", src, "--method", *extra, *flags, "-o", out, "--quiet")
    assert code == 0, err + stdout
    return stdout


FORMATS = ["bare", "wrapped", "prefixed", "safetensors", "module"]


def write_input(kind, model, path):
    sd = model.state_dict()
    if kind == "bare":
        torch.save(sd, path)
    elif kind == "wrapped":
        torch.save({"epoch": 7, "state_dict": sd, "optimizer": {"lr": 0.1}}, path)
    elif kind == "prefixed":
        torch.save({"model": OrderedDict(("module." + k, v) for k, v in sd.items())}, path)
    elif kind == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(model, path)


def read_back(kind, path, fresh_model):
    """Load the file exactly the way the input of that kind is loaded; returns (model, extras)."""
    if kind == "module":
        obj = torch.load(path, weights_only=False)
        return obj, {}
    if kind == "safetensors":
        state = load_file(str(path))
        extras = {}
    else:
        obj = torch.load(path, weights_only=True)
        if kind == "bare":
            state, extras = obj, {}
        elif kind == "wrapped":
            state, extras = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
        else:
            assert all(k.startswith("module.") for k in obj["model"])
            state, extras = {k[len("module."):]: v for k, v in obj["model"].items()}, {}
    attach_feature_norms(fresh_model, state)
    fresh_model.load_state_dict(state)
    return fresh_model, extras


@pytest.mark.parametrize("kind", FORMATS)
def test_rifle_output_keeps_the_format_and_differs_only_in_the_head(setup, nets, tmp_path, kind):
    model, flags = setup
    suffix = ".safetensors" if kind == "safetensors" else ".pt"
    src, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    write_input(kind, model, src)
    before = sha(src)
    trust = ["--trust-checkpoint"] if kind == "module" else ARCH
    _fix(src, out, flags, "rifle", *trust)
    assert sha(src) == before                                   # the input is never modified
    fixed, extras = read_back(kind, out, nets.Small(num_classes=5))
    if kind == "wrapped":
        assert extras == {"epoch": 7, "optimizer": {"lr": 0.1}}
    assert type(fixed) is type(model)
    a, b = model.state_dict(), fixed.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) == (not k.startswith("fc.")), k


@pytest.mark.parametrize("kind", ["bare", "safetensors", "module"])
def test_entame_feature_norm_output_loads_in_every_format(setup, nets, tmp_path, kind):
    model, flags = setup
    suffix = ".safetensors" if kind == "safetensors" else ".pt"
    src, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    write_input(kind, model, src)
    trust = ["--trust-checkpoint"] if kind == "module" else ARCH
    _fix(src, out, flags, "entame", "--feature-norm", *trust)
    fixed, _ = read_back(kind, out, nets.Small(num_classes=5))
    assert isinstance(fixed.fc, FeatureNormLinear)
    for k, v in model.state_dict().items():                     # backbone bit-identical
        if not k.startswith("fc."):
            assert torch.equal(v, fixed.state_dict()[k]), k
    assert set(fixed.state_dict()) - set(model.state_dict()) == {"fc.feature_norm.mean", "fc.feature_norm.var"}
    side = json.loads(out.with_name(out.name + ".ftdoctor.json").read_text())
    assert any("attach_feature_norms" in n for n in side["notes"])
    # ftdoctor loads its own output back: a probe of the fixed file sees the floor
    code, js, err = run_cli("probe", out, *(["--trust-checkpoint"] if kind == "module" else ARCH), *flags,
                            "--probes", "noise", "--format", "json")
    assert code == 0, err
    noise = json.loads(js)["probes"]["noise"]
    assert abs(noise["noise_fraction"] - 0.25) < 1e-3


def test_sidecar_records_the_run(setup, tmp_path):
    model, flags = setup
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), src)
    _fix(src, out, flags, "entame", *ARCH, "--seed", "4")
    side = json.loads((tmp_path / "out.pt.ftdoctor.json").read_text())
    assert side["method"] == "entame" and side["seed"] == 4 and side["parameters"]["phi_w"] == 1e-12
    assert side["input"]["path"] == str(src) and side["input"]["sha256"] == sha(src)
    assert side["output"]["sha256"] == sha(out) and side["output"]["format"] == "state_dict"
    assert set(side["versions"]) >= {"ftdoctor", "torch", "python"}
    checks = {c["name"]: c for c in side["verification"]["checks"]}
    assert checks["cross_entropy"]["passed"] and checks["noise_fraction"]["passed"]
    assert side["verification"]["passed"] is True


def test_output_onto_the_input_or_an_existing_file_is_refused(setup, tmp_path):
    model, flags = setup
    src = tmp_path / "in.pt"
    torch.save(model.state_dict(), src)
    before = sha(src)
    code, _, err = run_cli("fix", src, *ARCH, "--method", "rifle", *flags, "-o", src)
    assert code == 2 and "error:" in err and "hint:" in err and "overwrite the input" in err
    assert sha(src) == before
    existing = tmp_path / "exists.pt"
    existing.write_text("keep")
    code, _, err = run_cli("fix", src, *ARCH, "--method", "rifle", *flags, "-o", existing)
    assert code == 2 and "--force" in err and existing.read_text() == "keep"
    code, _, err = run_cli("fix", src, *ARCH, "--method", "rifle", *flags, "-o", existing, "--force")
    assert code == 0, err
    torch.load(existing, weights_only=True)


@pytest.mark.parametrize("exc", [RuntimeError("No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_nothing(setup, tmp_path, monkeypatch, exc):
    model, flags = setup
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), src)
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)                              # half the work done …
        raise exc                                               # … then the disk fills up / Ctrl-C
    monkeypatch.setattr(torch, "save", broken_save)
    code, _, err = run_cli("fix", src, *ARCH, "--method", "rifle", *flags, "-o", out)
    assert code == (2 if isinstance(exc, RuntimeError) else 130)
    assert "error:" in err and "hint:" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "in.pt"]


def test_torchscript_is_refused_with_what_to_pass(setup, nets, tmp_path):
    _, flags = setup
    ts = tmp_path / "ts.pt"
    torch.jit.script(nets.Small(num_classes=5)).save(str(ts))
    code, _, err = run_cli("fix", ts, "--method", "rifle", *flags, "-o", tmp_path / "o.pt")
    assert code == 2 and "TorchScript" in err and "--arch" in err
    assert not (tmp_path / "o.pt").exists()


def test_bad_method_and_misplaced_options_are_exit_2(setup, tmp_path):
    model, flags = setup
    src = tmp_path / "in.pt"
    torch.save(model.state_dict(), src)
    code, _, err = run_cli("fix", src, *ARCH, "--method", "magic", *flags, "-o", tmp_path / "o.pt")
    assert code == 2 and "entame, rifle, rescale, datadep" in err
    code, _, err = run_cli("fix", src, *ARCH, "--method", "rifle", "--phi-w", "1e-3", *flags, "-o", tmp_path / "o.pt")
    assert code == 2 and "--phi-w" in err and "entame" in err
    assert not (tmp_path / "o.pt").exists()


def test_help_lists_every_registered_method():
    from ftdoctor.fixes import FIXES
    code, out, _ = run_cli("fix", "--help")
    assert code == 0
    for name, cls in FIXES.items():
        assert name in out


@pytest.mark.parametrize("kind", FORMATS)
def test_the_same_inputs_and_seed_write_the_same_bytes(setup, tmp_path, kind):
    """Determinism reaches the files: the same checkpoint, data and --seed give byte-identical outputs in
    every format, so the sidecars (which record the output's sha256) are identical too."""
    model, flags = setup
    src = tmp_path / ("in.safetensors" if kind == "safetensors" else "in.pt")
    write_input(kind, model, src)
    trust = ["--trust-checkpoint"] if kind == "module" else ARCH
    outs = [tmp_path / f"run{i}" / src.name.replace("in", "out") for i in (1, 2)]
    for out in outs:
        out.parent.mkdir()
        _fix(src, out, flags, "rifle", "--seed", "3", *trust)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    sidecars = [json.loads(o.with_name(o.name + ".ftdoctor.json").read_text()) for o in outs]
    for record in sidecars:
        record["output"].pop("path")          # the one thing that differs: where it was written
    assert sidecars[0] == sidecars[1]
