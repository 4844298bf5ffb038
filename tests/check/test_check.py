"""``ftdoctor check`` (SPEC §4): verdicts, config discovery, formats, exit codes.

Numbers are checked against independent computations: the noise fraction from
the logits by hand (ENTAME Table 1: ζ / (ζ + 1 − 2κ)), the drift from the
weights (‖W − W⁰‖ / ‖W⁰‖), the NaN count from the tensor.
"""
from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NETS_SOURCE
from helpers import run_cli
from ftdoctor.check import (CheckReport, CheckResult, CheckpointVerdict, collect_checkpoints,
                            find_pyproject, planned_checks, resolve_thresholds)
from ftdoctor.errors import FtdoctorError
from ftdoctor.report import github, junit
from ftdoctor.thresholds import Thresholds

NETS = NETS_SOURCE
ARCH = ["--arch", "ftd_check_nets:SmallCNN"]


def _nets():
    sys.path.insert(0, os.getcwd())
    try:
        import importlib
        import ftd_check_nets
        return importlib.reload(ftd_check_nets)
    finally:
        sys.path.pop(0)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with the test architectures, a good and a NaN checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    (tmp_path / "ftd_check_nets.py").write_text(NETS)
    nets = _nets()
    torch.manual_seed(0)
    good = nets.SmallCNN(10)
    torch.save(good.state_dict(), tmp_path / "good.pt")
    bad = nets.SmallCNN(10)
    with torch.no_grad():
        bad.features[3].weight[0, 0, 0, 0] = float("nan")
        bad.features[3].weight[1, 2, 0, 0] = float("inf")
    torch.save(bad.state_dict(), tmp_path / "nan.pt")
    return tmp_path


def run(*args, env=None, monkeypatch=None, capsys=None):
    """The real entry point (error mapping included): (exit code, stdout, stderr)."""
    return tuple(run_cli(*args, env=env))


# -- config discovery ----------------------------------------------------------------------------
def test_pyproject_found_in_a_parent_and_flags_win(tmp_path):
    proj = tmp_path / "proj"
    sub = proj / "a" / "b"
    sub.mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[project]\nname='x'\n[tool.ftdoctor.check]\n"
                                         "max_noise_fraction = 0.25\nexpect_num_classes = 7\n")
    got = resolve_thresholds(cwd=sub)
    assert got.source == str((proj / "pyproject.toml").resolve())
    assert got.thresholds.max_noise_fraction == 0.25 and got.thresholds.expect_num_classes == 7
    assert got.thresholds.min_depth_ratio == Thresholds().min_depth_ratio          # untouched keys keep defaults
    over = resolve_thresholds(cwd=sub, overrides={"max_noise_fraction": "0.9", "expect_num_classes": "off"})
    assert over.thresholds.max_noise_fraction == 0.9 and over.thresholds.expect_num_classes is None


def test_nearest_pyproject_without_ftdoctor_table_is_passed_over(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.ftdoctor.check]\nmax_drift_rel = 0.125\n")
    inner = tmp_path / "pkg"
    inner.mkdir()
    (inner / "pyproject.toml").write_text("[project]\nname = 'pkg'\n[tool.black]\nline-length = 100\n")
    assert find_pyproject(inner) == (tmp_path / "pyproject.toml").resolve()
    assert resolve_thresholds(cwd=inner).thresholds.max_drift_rel == 0.125


def test_nearest_ftdoctor_table_wins_over_a_farther_one(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.ftdoctor.check]\nmax_drift_rel = 0.125\n")
    inner = tmp_path / "pkg"
    inner.mkdir()
    (inner / "pyproject.toml").write_text("[tool.ftdoctor.check]\nmax_drift_rel = 0.25\n")
    assert resolve_thresholds(cwd=inner).thresholds.max_drift_rel == 0.25


def test_unknown_key_lists_the_valid_ones(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tool.ftdoctor.check]\nmax_noise_fractoin = 0.1\n")
    with pytest.raises(FtdoctorError) as exc:
        resolve_thresholds(cfg)
    assert exc.value.exit_code == 2 and "max_noise_fractoin" in exc.value.cause
    for key in Thresholds.keys():
        assert key in exc.value.remedy


@pytest.mark.parametrize("line, fragment", [
    ("require_finite = 1", "true or false"),
    ("expect_num_classes = 2.5", "whole number"),
    ("max_drift_rel = 'lots'", "finite number"),
    ("max_drift_rel = -1.0", "finite number"),
    ("max_drift_rel = nan", "finite number"),
])
def test_bad_values_are_config_errors(tmp_path, line, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[tool.ftdoctor.check]\n{line}\n")
    with pytest.raises(FtdoctorError) as exc:
        resolve_thresholds(cfg)
    assert fragment in exc.value.cause and exc.value.exit_code == 2


def test_false_disables_a_check_and_bare_keys_work_with_config(tmp_path):
    cfg = tmp_path / "ftdoctor.toml"
    cfg.write_text("max_change_rate_cv = false\nmin_depth_ratio = 0\n")
    t = resolve_thresholds(cfg).thresholds
    assert t.max_change_rate_cv is None and t.min_depth_ratio == 0.0
    plan = planned_checks(t, with_data=True, with_reference=False)
    assert "max_change_rate_cv" not in plan and "min_depth_ratio" in plan and "min_r2_median" not in plan
    assert planned_checks(t, with_data=False, with_reference=True) == [
        "pickle_safe", "loadable", "require_finite", "head_found", "max_drift_rel"]


def test_invalid_toml_is_a_config_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.ftdoctor.check\nmax = 1\n")
    with pytest.raises(FtdoctorError) as exc:
        resolve_thresholds(cwd=tmp_path)
    assert "not valid TOML" in exc.value.cause


# -- which files -----------------------------------------------------------------------------------
def test_collect_files_directories_globs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("m/a.pt", "m/sub/b.safetensors", "m/notes.txt", "m/.hidden/c.pt", "m/.d.pt", "x.pth"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [str(p) for p in collect_checkpoints(["m"])] == ["m/a.pt", "m/sub/b.safetensors"]
    assert [str(p) for p in collect_checkpoints(["m/**/*.pt", "x.pth", "m/a.pt"])] == ["m/a.pt", "x.pth"]
    (tmp_path / "empty").mkdir()
    for bad in (["empty"], ["nope*.pt"], ["missing.pt"], []):
        with pytest.raises(FtdoctorError) as exc:
            collect_checkpoints(bad)
        assert exc.value.exit_code == 2


# -- verdicts and formats --------------------------------------------------------------------------
def test_pass_and_fail_in_one_call_every_format(work, capsys, monkeypatch):
    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, "--format", "json", capsys=capsys)
    assert code == 1, err
    doc = json.loads(out)
    assert doc["schema"] == "ftdoctor.check/1" and doc["passed"] is False
    verdicts = {c["path"]: c["passed"] for c in doc["checkpoints"]}
    assert verdicts == {"good.pt": True, "nan.pt": False}
    bad = {c["name"]: c for c in doc["checkpoints"][1]["checks"]}
    assert [c["name"] for c in doc["checkpoints"][1]["checks"]] == ["pickle_safe", "loadable", "require_finite",
                                                                     "head_found"]
    assert bad["require_finite"]["passed"] is False and bad["require_finite"]["value"] == 2   # 1 NaN + 1 Inf
    assert "features.3.weight" in bad["require_finite"]["message"]
    assert bad["head_found"]["passed"] is True and bad["head_found"]["value"] == "fc"

    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, "--format", "junit", "--output", "r.xml",
                         capsys=capsys)
    assert code == 1
    root = ET.parse(work / "r.xml").getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["good.pt", "nan.pt"]
    assert len(root.findall(".//testcase")) == 8 and len(root.findall(".//failure")) == 1
    assert root.get("failures") == "1" and suites[1].get("failures") == "1"
    failure = suites[1].find("testcase[@name='require_finite']/failure")
    assert "features.3.weight" in failure.get("message")
    assert "FAIL" in out                                       # the terminal still gets the text view

    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, "--format", "github", capsys=capsys)
    assert code == 1
    assert out.splitlines() == [l for l in out.splitlines() if l.startswith("::error title=ftdoctor ")]
    assert len(out.splitlines()) == 1
    assert out.startswith("::error title=ftdoctor require_finite::nan.pt: NaN or Inf in features.3.weight")


def test_exit_codes_same_in_every_format(work, capsys):
    for fmt in ("text", "json", "junit", "github"):
        assert run("check", "good.pt", *ARCH, "--format", fmt, capsys=capsys)[0] == 0
        assert run("check", "good.pt", "nan.pt", *ARCH, "--format", fmt, capsys=capsys)[0] == 1
        assert run("check", "good.pt", *ARCH, "--format", fmt, "--max-drift-rel", "x", capsys=capsys)[0] == 2


def test_github_chosen_by_itself_under_actions(work, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, capsys=capsys)
    assert code == 1 and out.startswith("::error title=ftdoctor require_finite::nan.pt:")
    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, "--format", "json", capsys=capsys)
    assert json.loads(out)["passed"] is False                   # an explicit format wins
    code, out, err = run("check", "good.pt", "nan.pt", *ARCH, "--format", "junit", "--output", "r.xml",
                         capsys=capsys)
    assert code == 1 and out.startswith("::error title=ftdoctor require_finite::nan.pt:")   # the log annotates
    assert len(ET.parse(work / "r.xml").getroot().findall(".//failure")) == 1


def test_nan_fails_require_finite_naming_layer_and_can_be_disabled(work, capsys):
    code, out, err = run("check", "nan.pt", *ARCH, "--format", "json", capsys=capsys)
    msg = json.loads(out)["checkpoints"][0]["checks"][2]
    assert code == 1 and msg["name"] == "require_finite"
    assert "features.3.weight (2 of 576 values NaN and Inf)" in msg["message"]
    code, out, err = run("check", "nan.pt", *ARCH, "--no-require-finite", "--format", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["thresholds"]["require_finite"] is False
    assert [c["name"] for c in doc["checkpoints"][0]["checks"]] == ["pickle_safe", "loadable", "head_found"]


def test_expect_num_classes_from_pyproject_and_flag(work, capsys):
    (work / "pyproject.toml").write_text("[tool.ftdoctor.check]\nexpect_num_classes = 5\n")
    code, out, err = run("check", "good.pt", *ARCH, "--format", "json", capsys=capsys)
    doc = json.loads(out)
    c = {x["name"]: x for x in doc["checkpoints"][0]["checks"]}["expect_num_classes"]
    assert code == 1 and c["value"] == 10 and c["threshold"] == 5 and "expected 5" in c["message"]
    assert doc["config"] == str((work / "pyproject.toml").resolve())
    assert run("check", "good.pt", *ARCH, "--expect-num-classes", "10", capsys=capsys)[0] == 0
    assert run("check", "good.pt", *ARCH, "--expect-num-classes", "off", capsys=capsys)[0] == 0


def test_unknown_key_exits_2_listing_valid_keys(work, capsys):
    (work / "pyproject.toml").write_text("[tool.ftdoctor.check]\nmax_noise_fractoin = 0.1\n")
    code, out, err = run("check", "good.pt", *ARCH, "--output", "r.json", "--format", "json", capsys=capsys)
    assert code == 2 and "Traceback" not in err and out == ""
    assert "max_noise_fractoin" in err and all(k in err for k in Thresholds.keys())
    assert not (work / "r.json").exists()


def test_drift_against_reference_matches_weights(work, capsys):
    nets = _nets()
    torch.manual_seed(0)
    ref = nets.SmallCNN(10)                      # the same draw as good.pt
    moved = nets.SmallCNN(10)
    moved.load_state_dict(ref.state_dict())
    with torch.no_grad():
        moved.features[3].weight.mul_(1.75)      # rel drift exactly 0.75
        moved.fc.weight.add_(0.01)
    torch.save(moved.state_dict(), work / "moved.pt")
    code, out, err = run("check", "good.pt", "moved.pt", *ARCH, "--reference", "good.pt", "--format", "json",
                         capsys=capsys)
    doc = json.loads(out)
    drift = {c["path"]: {x["name"]: x for x in c["checks"]}["max_drift_rel"] for c in doc["checkpoints"]}
    assert code == 1
    assert drift["good.pt"]["passed"] is True and drift["good.pt"]["value"] == 0.0
    w, w0 = moved.fc.weight.detach().double(), ref.fc.weight.detach().double()
    fc_rel = float((w - w0).norm() / w0.norm())
    assert fc_rel < 0.75
    assert drift["moved.pt"]["passed"] is False and math.isclose(drift["moved.pt"]["value"], 0.75, rel_tol=1e-6)
    assert "features.3" in drift["moved.pt"]["message"]
    assert run("check", "moved.pt", *ARCH, "--reference", "good.pt", "--max-drift-rel", "0.8",
               capsys=capsys)[0] == 0


def test_output_file_is_atomic_and_never_the_model(work, capsys):
    code, out, err = run("check", "good.pt", *ARCH, "--output", "good.pt", capsys=capsys)
    assert code == 2 and "refusing" in err
    code, out, err = run("check", "good.pt", *ARCH, "--format", "text", "--output", "r.txt", capsys=capsys)
    assert code == 0 and out == "" and "PASS good.pt" in (work / "r.txt").read_text()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


# -- renderers ---------------------------------------------------------------------------------------
def _report() -> CheckReport:
    return CheckReport((
        CheckpointVerdict("a.pt", (CheckResult("loadable", True, True, None, "ok"),
                                   CheckResult("max_drift_rel", False, 0.9, 0.5, "drift 0.9 > 0.5\nsecond line 100%"))),
        CheckpointVerdict("dir,x/b:c.pt", (CheckResult("loadable", False, False, None, "bad\x00file"),
                                           CheckResult("head_found", None, None, None, "not run: loadable failed"))),
    ), Thresholds())


def test_github_escapes_so_a_message_cannot_forge_commands():
    lines = github.render(_report()).splitlines()
    assert lines == ["::error title=ftdoctor max_drift_rel::a.pt: drift 0.9 > 0.5%0Asecond line 100%25",
                     "::error title=ftdoctor loadable::dir,x/b:c.pt: bad\x00file"]


def test_junit_counts_and_skips_and_survives_control_characters():
    root = ET.fromstring(junit.render(_report()).split("\n", 1)[1])
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "2", "1")
    b = root.findall("testsuite")[1]
    assert b.find("testcase[@name='head_found']/skipped") is not None
    assert b.find("testcase[@name='loadable']/failure").get("message") == "bad\ufffdfile"
    assert b.find("testcase").get("classname") == "dir,x/b:c_pt"


def test_report_json_verdicts():
    doc = _report().to_json()
    assert doc["passed"] is False and [c["passed"] for c in doc["checkpoints"]] == [False, False]
    assert doc["checkpoints"][1]["checks"][1]["passed"] is None       # skipped, not passed
    assert CheckpointVerdict("c.pt", (CheckResult("x", None, None, None, ""),)).passed  # skipped alone passes


# -- probe-based checks (need data) -----------------------------------------------------------------
@pytest.fixture
def npz(work):
    """64 fixed examples as float N×C×H×W in an .npz, used with --normalize none (inputs as stored)."""
    g = np.random.default_rng(0)
    x = g.standard_normal((64, 3, 16, 16)).astype("float32")
    y = g.integers(0, 10, 64)
    np.savez(work / "d.npz", x=x, y=y)
    return x, y


DATA = ["--data", "d.npz", "--normalize", "none", "--max-samples", "64", "--batch-size", "16", "--quiet"]


def _model(work, name="good.pt"):
    nets = _nets()
    m = nets.SmallCNN(10)
    m.load_state_dict(torch.load(work / name, weights_only=True))
    return m.eval()


def test_noise_and_depth_values_match_a_hand_computation(work, npz, capsys):
    x, y = npz
    code, out, err = run("check", "good.pt", *ARCH, *DATA, "--format", "json", capsys=capsys)
    checks = {c["name"]: c for c in json.loads(out)["checkpoints"][0]["checks"]}
    assert checks["runs_on_data"]["passed"] is True and checks["runs_on_data"]["value"] == 64

    model = _model(work)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    with torch.no_grad():
        p = torch.softmax(model(xt).double(), dim=1)
    zeta = float((p ** 2).sum(1).mean())                  # ENTAME: ζ = mean ‖ŷ‖²
    kappa = float(p[torch.arange(64), yt].mean())         # κ = mean ŷ_y
    phi = zeta + 1 - 2 * kappa
    assert math.isclose(checks["max_noise_fraction"]["value"], zeta / phi, rel_tol=1e-6)
    assert math.isclose(checks["max_excess_noise_fraction"]["value"], (zeta - 0.1) / phi, rel_tol=1e-6)
    for key in ("max_noise_fraction", "max_excess_noise_fraction"):
        c = checks[key]
        assert c["passed"] == (c["value"] <= c["threshold"])

    # RIFLE depth ratio by hand: mean over batches of ‖∇W L_b‖ for the first layer / the head
    norms = {"features.0": [], "fc": []}
    for b in range(4):
        model.zero_grad()
        sl = slice(16 * b, 16 * b + 16)
        torch.nn.functional.cross_entropy(model(xt[sl]), yt[sl]).backward()
        norms["features.0"].append(float(model.features[0].weight.grad.norm()))
        norms["fc"].append(float(model.fc.weight.grad.norm()))
    depth = np.mean(norms["features.0"]) / np.mean(norms["fc"])
    assert math.isclose(checks["min_depth_ratio"]["value"], depth, rel_tol=1e-5)


def test_thresholds_from_parent_pyproject_then_flag_with_data(work, npz, capsys):
    sub = work / "a" / "b"
    sub.mkdir(parents=True)
    (work / "pyproject.toml").write_text(
        "[tool.ftdoctor.check]\nmax_noise_fraction = 0.0001\nmax_excess_noise_fraction = 1.0\n"
        "max_change_rate_spread = 1e12\nmax_change_rate_cv = 1e12\nmin_depth_ratio = 0.0\n")
    os.chdir(sub)
    args = ["check", "../../good.pt", *ARCH, *DATA[:1], "../../d.npz", *DATA[2:], "--format", "json"]
    sys.path.insert(0, str(work))
    try:
        code, out, err = run(*args, capsys=capsys)
        doc = json.loads(out)
        failed = [c["name"] for c in doc["checkpoints"][0]["checks"] if c["passed"] is False]
        assert code == 1 and failed == ["max_noise_fraction"], err
        assert doc["thresholds"]["max_noise_fraction"] == 0.0001
        code, out, err = run(*args, "--max-noise-fraction", "1.0", capsys=capsys)
        assert code == 0 and json.loads(out)["thresholds"]["max_noise_fraction"] == 1.0
    finally:
        sys.path.remove(str(work))


def test_only_the_probes_the_thresholds_need_run(work, npz, capsys, monkeypatch):
    import ftdoctor.diagnose as diagnose
    asked = []
    real = diagnose.probe_model

    def spy(model, bundle, options, **kw):
        asked.append(options.probes)
        return real(model, bundle, options, **kw)

    monkeypatch.setattr(diagnose, "probe_model", spy)
    off = ["--max-change-rate-spread", "off", "--max-change-rate-cv", "off", "--min-depth-ratio", "off"]
    code, out, err = run("check", "good.pt", *ARCH, *DATA, *off, "--format", "json", capsys=capsys)
    assert asked == [("noise",)]
    names = [c["name"] for c in json.loads(out)["checkpoints"][0]["checks"]]
    assert names == ["pickle_safe", "loadable", "require_finite", "head_found", "runs_on_data", "max_noise_fraction",
                     "max_excess_noise_fraction"]
    asked.clear()
    run("check", "good.pt", *ARCH, *DATA, "--reference", "good.pt", "--max-noise-fraction", "off",
        "--max-excess-noise-fraction", "off", "--format", "json", capsys=capsys)
    assert asked == [("change_rate", "grad_norm", "r2")]


def test_r2_against_itself_passes_and_threshold_flips_verdict(work, npz, capsys):
    code, out, err = run("check", "good.pt", *ARCH, *DATA, "--reference", "good.pt", "--format", "json",
                         "--max-excess-noise-fraction", "off", "--max-noise-fraction", "off", capsys=capsys)
    checks = {c["name"]: c for c in json.loads(out)["checkpoints"][0]["checks"]}
    assert math.isclose(checks["min_r2_median"]["value"], 1.0, rel_tol=1e-9)
    assert checks["max_drift_rel"]["value"] == 0.0
    spread = checks["max_change_rate_spread"]["value"]
    assert spread >= 1.0
    for thr, want in ((spread * 1.001, 0), (spread * 0.999, 1)):
        code, out, err = run("check", "good.pt", *ARCH, *DATA, "--max-change-rate-spread", str(thr),
                             "--max-noise-fraction", "off", "--max-excess-noise-fraction", "off",
                             "--max-change-rate-cv", "off", "--min-depth-ratio", "off", capsys=capsys)
        assert code == want, out


def test_head_that_is_not_affine_fails_head_found(work, capsys):
    code, out, err = run("check", "good.pt", *ARCH, "--head", "features.1", "--format", "json", capsys=capsys)
    checks = {c["name"]: c for c in json.loads(out)["checkpoints"][0]["checks"]}
    assert code == 1 and checks["head_found"]["passed"] is False
    assert "features.1" in checks["head_found"]["message"] and "fc" in checks["head_found"]["message"]
    assert run("check", "good.pt", *ARCH, "--head", "fc", capsys=capsys)[0] == 0


def test_library_call_is_ftdoctor_check(work):
    import ftdoctor
    import ftdoctor.check                       # the submodule shadows the lazy attribute; it still calls
    report = ftdoctor.check(["good.pt", "nan.pt"], model=ftdoctor.ModelOptions(arch="ftd_check_nets:SmallCNN"))
    assert isinstance(report, CheckReport) and report.exit_code == 1
    assert [v.passed for v in report.checkpoints] == [True, False]
    assert report.checkpoints[1].failures[0].name == "require_finite"


def test_max_noise_fraction_takes_a_multiple_of_the_floor(tmp_path):
    from ftdoctor.check.config import resolve_thresholds
    from ftdoctor.errors import FtdoctorError
    from ftdoctor.thresholds import FloorMultiple, Thresholds

    assert Thresholds().max_noise_fraction == FloorMultiple(2.0)
    cfg = tmp_path / "f.toml"
    cfg.write_text('[tool.ftdoctor.check]\nmax_noise_fraction = "1.5x"\n')
    assert resolve_thresholds(cfg).thresholds.max_noise_fraction == FloorMultiple(1.5)
    flags = resolve_thresholds(cfg, overrides={"max_noise_fraction": "3×"}).thresholds
    assert flags.max_noise_fraction == FloorMultiple(3.0)
    assert resolve_thresholds(cfg, overrides={"max_noise_fraction": "0.4"}).thresholds.max_noise_fraction == 0.4
    with pytest.raises(FtdoctorError) as err:
        resolve_thresholds(cfg, overrides={"max_noise_fraction": "two"})
    assert '"2x"' in err.value.remedy


def test_a_mixed_folder_maps_globs_to_architectures(tmp_path, monkeypatch):
    """torchvision is recognised by itself; the timm and the import-path checkpoints get their architecture
    from [tool.ftdoctor.check.arch]; --arch would win over both."""
    timm = pytest.importorskip("timm")
    import torchvision

    from ftdoctor.zoo import ShapesNet

    for sub in ("tv", "timm", "own"):
        (tmp_path / "exports" / sub).mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "exports/tv/r18.pt")
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=10).state_dict(),
               tmp_path / "exports/timm/convnext.pt")
    torch.save(ShapesNet(num_classes=10).state_dict(), tmp_path / "exports/own/shapes.pt")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ftdoctor.check]\nexpect_num_classes = 10\n\n[tool.ftdoctor.check.arch]\n'
        '"exports/timm/*.pt" = "timm:convnext_atto"\n"exports/own/*" = "ftdoctor.zoo:ShapesNet"\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("check", "exports", "--format", "json")
    assert code == 0, out + err
    archs = {Path(c["path"]).name: c["arch"] for c in json.loads(out)["checkpoints"]}
    assert archs == {"r18.pt": "resnet18", "convnext.pt": "timm:convnext_atto", "shapes.pt": "ftdoctor.zoo:ShapesNet"}
    (tmp_path / "pyproject.toml").write_text('[tool.ftdoctor.check.arch]\n"exports/timm/*.pt" = "timm:convnext_atoo"\n')
    code, out, err = run_cli("check", "exports")
    assert code == 2 and "convnext_atoo" in err and "timm:convnext_atto" in err
