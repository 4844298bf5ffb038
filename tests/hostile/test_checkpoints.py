"""Hostile inputs through ``check`` and ``probe`` (SPEC §8).

Each input gets the SPEC behaviour: ``check`` turns a broken checkpoint into a
failed check (exit 1) and bad invocations into exit 2; ``probe`` exits 2 with
one line of cause and one of remedy, or reports the problem as a finding. Never
a traceback, never a file written, never code from a pickle run.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import NETS_SOURCE
from helpers import run_cli
from ftdoctor.check import check
from ftdoctor.checkpoint import ModelOptions
from ftdoctor.errors import FtdoctorError

NETS = NETS_SOURCE
ARCH = ["--arch", "ftd_hostile_nets:SmallCNN"]
DATA = ["--data", "shapes:10", "--max-samples", "32", "--batch-size", "16", "--quiet"]
MARKER = "pwned-by-pickle"


class Evil:
    """A pickle that would create a file if it were ever unpickled with full pickle."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


def _nets(cwd: Path):
    sys.path.insert(0, str(cwd))
    try:
        import importlib
        import ftd_hostile_nets
        return importlib.reload(ftd_hostile_nets)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One directory of hostile checkpoints (and one good one), made once."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "ftd_hostile_nets.py").write_text(NETS)
    nets = _nets(d)
    torch.manual_seed(0)
    good = nets.SmallCNN(10)
    torch.save(good.state_dict(), d / "good.pt")
    raw = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "corrupt.pt").write_bytes(bytes(range(256)) * 8)
    (d / "corrupt.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{not json")
    (d / "empty.pt").write_bytes(b"")
    torch.save({"state_dict": good.state_dict(), "evil": Evil()}, d / "evil.pt")
    torch.save(Evil(), d / "evil_alone.pt")
    nan = nets.SmallCNN(10)
    nan.load_state_dict(good.state_dict())
    with torch.no_grad():
        nan.features[3].weight[0, 0, 0, 0] = float("nan")
        nan.fc.bias[2] = float("-inf")
    torch.save(nan.state_dict(), d / "nan.pt")
    torch.save(nets.NoAffine().state_dict(), d / "noaffine.pt")
    torch.save(nets.SmallCNN(5).state_dict(), d / "five.pt")
    (d / "emptydir").mkdir()
    return d


def run(cwd: Path, *args, capsys):
    """The real entry point in ``cwd``: (exit code, stdout, stderr, files created)."""
    before = set(p.relative_to(cwd) for p in cwd.rglob("*"))
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        code, out, err = run_cli(*args)
    finally:
        os.chdir(old_cwd)
    after = set(p.relative_to(cwd) for p in cwd.rglob("*"))
    created = sorted(str(p) for p in after - before if "__pycache__" not in str(p))
    return code, out, err, created


def _checks(out: str) -> dict[str, dict]:
    doc = json.loads(out)
    return {c["name"]: c for c in doc["checkpoints"][0]["checks"]}


@pytest.mark.parametrize("name, fragment", [
    ("truncated.pt", "truncated"),
    ("corrupt.pt", "not a readable checkpoint"),
    ("corrupt.safetensors", "safetensors"),
    ("empty.pt", "empty"),
])
def test_unloadable_is_a_failed_loadable_check_and_a_probe_error(files, capsys, name, fragment):
    code, out, err, created = run(files, "check", name, "good.pt", *ARCH, "--format", "json", capsys=capsys)
    assert code == 1 and "Traceback" not in err and created == []
    checks = _checks(out)
    assert checks["loadable"]["passed"] is False and fragment in checks["loadable"]["message"]
    # a damaged pickle cannot be judged past its damage: pickle_safe fails too, saying where
    if checks["pickle_safe"]["passed"] is False:
        assert "damaged" in checks["pickle_safe"]["message"] and "offset" in checks["pickle_safe"]["message"]
    assert all(c["passed"] is None for n, c in checks.items() if n not in ("loadable", "pickle_safe"))
    assert json.loads(out)["checkpoints"][1]["passed"] is True                            # the good one still judged
    code, out, err, created = run(files, "probe", name, *ARCH, *DATA, "--output", "r.json", "--hdf5", "r.h5",
                                  capsys=capsys)
    assert code == 2 and "Traceback" not in err and created == [] and out == ""
    assert err.startswith("error:") and "hint:" in err and len(err.strip().splitlines()) == 2
    assert not (files / MARKER).exists()


@pytest.mark.parametrize("name", ["evil_alone.pt", "evil.pt"])
def test_malicious_pickle_fails_pickle_safe_naming_its_global_and_runs_nothing(files, capsys, name):
    """Alone or beside a state dict, a pickle that calls builtins.open fails pickle_safe and is never loaded;
    probe refuses it naming the global and the remedy."""
    code, out, err, created = run(files, "check", name, *ARCH, "--format", "json", capsys=capsys)
    checks = _checks(out)
    assert code == 1 and checks["pickle_safe"]["passed"] is False and created == []
    assert "io.open (REDUCE" in checks["pickle_safe"]["message"]      # builtins.open is io.open
    assert all(c["passed"] is None and "pickle_safe failed" in c["message"]
               for n, c in checks.items() if n != "pickle_safe")
    code, out, err, created = run(files, "probe", name, *ARCH, *DATA, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 2 and "io.open" in err
    assert "--trust-checkpoint" in err and f"ftdoctor check {name}" in err
    assert not (files / MARKER).exists() and created == []


def test_nan_weights_fail_require_finite_and_skip_the_probes(files, capsys):
    code, out, err, created = run(files, "check", "nan.pt", *ARCH, *DATA, "--format", "json", capsys=capsys)
    checks = _checks(out)
    assert code == 1 and created == [] and "Traceback" not in err
    fin = checks["require_finite"]
    assert fin["passed"] is False and fin["value"] == 2
    assert "features.3.weight (1 of 576 values NaN)" in fin["message"]
    assert "fc.bias (1 of 10 values Inf)" in fin["message"]
    for name in ("runs_on_data", "max_noise_fraction", "max_change_rate_spread", "min_depth_ratio"):
        assert checks[name]["passed"] is None and "require_finite" in checks[name]["message"]


def test_nan_weights_without_require_finite_do_not_crash_the_probes(files, capsys):
    code, out, err, created = run(files, "check", "nan.pt", *ARCH, *DATA, "--no-require-finite",
                                  "--format", "json", capsys=capsys)
    assert code == 1 and "Traceback" not in err and created == []
    checks = _checks(out)
    # the logits are NaN: the figures cannot be measured, which fails rather than passes
    assert checks["max_noise_fraction"]["passed"] is False


def test_probe_on_nan_weights_reports_an_error_finding_or_exits_2(files, capsys):
    code, out, err, created = run(files, "probe", "nan.pt", *ARCH, *DATA, "--format", "json", capsys=capsys)
    assert "Traceback" not in err and created == []
    if code == 0:
        doc = json.loads(out)
        errors = [f for f in doc["findings"] if f["severity"] == "error"]
        assert any("features.3.weight" in f["message"] for f in errors)
    else:
        assert code == 2 and err.startswith("error:")


def test_model_without_affine_head(files, capsys):
    arch = ["--arch", "ftd_hostile_nets:NoAffine"]
    code, out, err, created = run(files, "check", "noaffine.pt", *arch, *DATA, "--format", "json", capsys=capsys)
    checks = _checks(out)
    assert code == 1 and created == []
    # the loader already refuses a model with no head to diagnose; whichever check says so, it names why
    failed = [c for c in checks.values() if c["passed"] is False]
    assert len(failed) == 1 and failed[0]["name"] in ("loadable", "head_found")
    assert "no affine layer" in failed[0]["message"]
    assert checks["head_found"]["passed"] is None and checks["max_noise_fraction"]["passed"] is None
    code, out, err, created = run(files, "probe", "noaffine.pt", *arch, *DATA, capsys=capsys)
    assert code == 2 and "no affine layer" in err and "Traceback" not in err and created == []


def test_head_class_mismatch(files, capsys):
    five = ["--arch", "ftd_hostile_nets:SmallCNN"]
    code, out, err, created = run(files, "check", "five.pt", *five, "--expect-num-classes", "10",
                                  "--format", "json", capsys=capsys)
    c = _checks(out)["expect_num_classes"]
    assert code == 1 and c["value"] == 5 and c["threshold"] == 10
    # on data with 10 classes, a 5-output head: a failed check that says what to do
    code, out, err, created = run(files, "check", "five.pt", *five, *DATA, "--format", "json", capsys=capsys)
    checks = _checks(out)
    assert code == 1 and checks["runs_on_data"]["passed"] is False
    assert "--new-head" in checks["runs_on_data"]["message"]
    assert "expect_num_classes" in checks["runs_on_data"]["message"]
    assert checks["max_noise_fraction"]["passed"] is None
    # --new-head judges the backbone with a fresh head for the data's classes instead
    code, out, err, created = run(files, "check", "five.pt", *five, *DATA, "--new-head", "--format", "json",
                                  "--max-excess-noise-fraction", "off", "--min-depth-ratio", "0",
                                  "--max-change-rate-spread", "off", "--max-change-rate-cv", "off",
                                  "--max-noise-fraction", "1", capsys=capsys)
    checks = _checks(out)
    assert code == 0, out
    assert checks["runs_on_data"]["passed"] is True and "fresh kaiming head" in checks["runs_on_data"]["message"]
    code, out, err, created = run(files, "probe", "five.pt", *five, *DATA, capsys=capsys)
    assert code == 2 and "--new-head" in err and "Traceback" not in err and created == []


def test_empty_directory_and_no_match(files, capsys):
    for target in ("emptydir", "nothing-*.pt", "missing.pt"):
        code, out, err, created = run(files, "check", target, *ARCH, "--output", "r.json", capsys=capsys)
        assert code == 2 and "Traceback" not in err and created == [] and err.startswith("error:")
    code, out, err, created = run(files, "probe", "emptydir", *ARCH, *DATA, capsys=capsys)
    assert code == 2 and "Traceback" not in err and created == []


# -- a fuzzer: any damage to a good file is a verdict or a clean error, never a crash ---------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoints_never_crash_check(files, data):
    raw = bytearray((files / "good.pt").read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    path = files / "fuzz.pt"
    path.write_bytes(bytes(raw))
    sys.path.insert(0, str(files))
    try:
        report = check([path], model=ModelOptions(arch="ftd_hostile_nets:SmallCNN"))
    finally:
        sys.path.pop(0)
    (verdict,) = report.checkpoints
    names = [c.name for c in verdict.checks]
    assert names == ["pickle_safe", "loadable", "require_finite", "head_found"]
    if verdict.checks[1].passed is False:
        assert all(c.passed is None for c in verdict.checks[2:])
    json.dumps(report.to_json(), allow_nan=False)       # always valid JSON


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_damaged_checkpoints_never_crash_probe(files, flips):
    """Flipped bytes land mostly in tensor data: the file may still load, with absurd or NaN weights.
    probe must then either report (valid JSON, no NaN) or refuse with an FtdoctorError."""
    from ftdoctor.data import DataOptions
    from ftdoctor.diagnose import probe
    raw = bytearray((files / "good.pt").read_bytes())
    for where, mask in flips:
        raw[int(where * len(raw))] ^= mask
    path = files / "fuzz-probe.pt"
    path.write_bytes(bytes(raw))
    sys.path.insert(0, str(files))
    try:
        report = probe(path, model=ModelOptions(arch="ftd_hostile_nets:SmallCNN"),
                       data=DataOptions(data="shapes:10", max_samples=16, batch_size=16))
    except FtdoctorError as exc:
        assert exc.exit_code == 2 and exc.cause and exc.remedy
        return
    finally:
        sys.path.pop(0)
    json.dumps(report.to_json(), allow_nan=False)
