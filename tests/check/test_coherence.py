"""One consistent diagnosis: what ``fix`` writes passes ``check``, or the chain of fixes ``check`` suggests gets
there in at most two more steps, and no suggestion throws away what an earlier fix did.

Two real pretrained models meet a new task: the demo's ShapesNet (pretrained on ``shapes``, fine-tuned to
``shapes:5``) and a torchvision resnet18 pretrained on ``shapes`` for a short while (fine-tuned to ``shapes:3``,
where the floor 1/(C−1) = 0.5 used to equal the absolute default threshold), at 64 px: at 32 px its layer4
sees 1×1 maps, whose 3×3 kernels get gradient at the centre tap only, which inflates the within-layer cv.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli

FIXES = (("entame",), ("entame", "--feature-norm"), ("rifle",), ("rescale",), ("datadep",))
TRY = re.compile(r"try `(ftdoctor fix [^`]+)`")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], list[str]]]:
    """name -> (pretrained checkpoint, model flags, data flags of the new task)."""
    import torchvision

    from ftdoctor.data import DataOptions, load_data
    from ftdoctor.demo import pretrain_source, train_classifier

    root = tmp_path_factory.mktemp("coherence")
    shapesnet = pretrain_source(root, seed=0, epochs=4)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    train_classifier(net, load_data(DataOptions(data="shapes", max_samples=1024, seed=0)), epochs=1, lr=3e-3,
                     seed=0)
    r18 = root / "r18.pt"
    torch.save(net.state_dict(), r18)
    return {"shapesnet": (shapesnet, ["--arch", "ftdoctor.zoo:ShapesNet"], ["--data", "shapes:5", "--max-samples", "256"]),
            "resnet18": (r18, ["--arch", "resnet18"], ["--data", "shapes:3", "--max-samples", "128", "--image-size", "64"])}


def _check(path: Path, model: list[str], data: list[str]) -> tuple[int, dict]:
    code, out, err = run_cli("check", str(path), *model, *data, "--format", "json")
    assert code in (0, 1), err
    return code, json.loads(out)["checkpoints"][0]


def _suggested(verdict: dict) -> list[str]:
    """The fix commands the failed checks print, in the order of the checks."""
    return [m.group(1) for c in verdict["checks"] if c["passed"] is False for m in TRY.finditer(c["message"])]


def _method(command: str) -> str:
    args = shlex.split(command)
    return args[args.index("--method") + 1]


@pytest.mark.parametrize("name", ["shapesnet", "resnet18"])
@pytest.mark.parametrize("fix", FIXES, ids=lambda f: "-".join(a.strip("-") for a in f))
def test_a_fix_passes_the_gate_or_its_suggestions_get_there_in_two_steps(models, name, fix, tmp_path):
    ckpt, model, data = models[name]
    out = tmp_path / "step0.pt"
    code, _, err = run_cli("fix", str(ckpt), *model, *data, "--method", *fix, "--new-head", "-o", str(out))
    assert code == 0, err
    chain, current = [fix[0]], out
    for step in (1, 2, 3):
        code, verdict = _check(current, model, data)
        if code == 0:
            break
        commands = _suggested(verdict)
        assert commands, f"check failed without a suggested fix: {verdict['checks']}"
        method = _method(commands[0])
        # the suggestions never undo each other: ENTAME's head is never thrown away by a re-drawn one
        assert not (method == "rifle" and "entame" in chain), (chain, commands[0])
        assert method not in chain[1:], f"{method} suggested twice: {chain}"
        assert step <= 2, f"no pass after {chain}: {[c['message'] for c in verdict['checks'] if c['passed'] is False]}"
        nxt = tmp_path / f"step{step}.pt"
        args = shlex.split(commands[0])[1:]
        args[args.index("FIXED.pt")] = str(nxt)
        code, _, err = run_cli(*args)          # the command exactly as printed, with the output named
        assert code == 0, (commands[0], err)
        chain.append(method)
        current = nxt
    assert code == 0, chain


def test_entame_head_is_recognised_and_the_backbone_judged_for_what_it_is(models, tmp_path):
    ckpt, model, data = models["shapesnet"]
    out = tmp_path / "entame.pt"
    assert run_cli("fix", str(ckpt), *model, *data, "--method", "entame", "--new-head", "-o", str(out)).exit_code == 0
    code, text, _ = run_cli("probe", str(out), *model, *data, "--format", "json")
    doc = json.loads(text)["probes"]
    cr, gn = doc["change_rate"], doc["grad_norm"]
    assert cr["head_kind"] == gn["head_kind"] == "max-entropy"
    # the head-inclusive figures show the design (the head learns ~1e6× faster) ...
    assert cr["spread"] > 1e6 and gn["depth_ratio"] < 1e-3
    # ... the backbone figures are those of the layers below the head, by their definition
    rates = [l["change_rate"] for l in cr["layers"] if l["name"] != cr["head"]]
    assert cr["backbone_spread"] == pytest.approx(max(rates) / min(rates), rel=1e-12)
    norms = {l["name"]: l["grad_norm"] for l in gn["layers"]}
    assert gn["backbone_depth_ratio"] == pytest.approx(norms[gn["layers"][0]["name"]] / norms[gn["backbone_top"]])
    code, text, _ = run_cli("check", str(out), *model, *data)
    assert code == 0 and "of the backbone" in text and "left out" in text


def test_a_trained_head_is_not_judged_as_noise(models):
    ckpt, model, _ = models["shapesnet"]
    code, verdict = _check(ckpt, model, ["--data", "shapes", "--max-samples", "256"])
    checks = {c["name"]: c for c in verdict["checks"]}
    assert checks["max_noise_fraction"]["passed"] is None
    assert "predicts these labels" in checks["max_noise_fraction"]["message"]


def test_probe_and_fix_measure_the_same_fresh_head(models, tmp_path):
    ckpt, model, data = models["shapesnet"]
    code, text, _ = run_cli("probe", str(ckpt), *model, *data, "--new-head", "--probes", "noise", "--format", "json")
    probed = json.loads(text)["probes"]["noise"]
    out = tmp_path / "e.pt"
    assert run_cli("fix", str(ckpt), *model, *data, "--method", "entame", "--new-head", "-o", str(out)).exit_code == 0
    before = json.loads(Path(str(out) + ".ftdoctor.json").read_text())["verification"]["noise_before"]
    for key in ("noise_fraction", "excess_noise_fraction", "cross_entropy"):
        assert before[key] == pytest.approx(probed[key], rel=1e-9), key
    # --seeds K averages K fresh heads; the first of them is the one --new-head alone installs
    code, text, _ = run_cli("probe", str(ckpt), *model, *data, "--new-head", "--seeds", "3", "--probes", "noise",
                            "--hdf5", str(tmp_path / "s.h5"))
    import h5py
    with h5py.File(tmp_path / "s.h5") as f:
        assert float(f["probes/noise/per_seed/noise_fraction"][0]) == pytest.approx(probed["noise_fraction"], rel=1e-9)


@pytest.mark.parametrize("classes", [2, 3, 5, 10, 100])
def test_default_thresholds_pass_a_correctly_fixed_model_at_every_class_count(models, classes, tmp_path):
    """The noise bounds follow the floor 1/(C−1): a maximum-entropy head passes at C = 2 (floor 1) as at
    C = 100 (floor 0.0101), and a fresh He head at the same C fails."""
    from ftdoctor import shapes

    ckpt, model, _ = models["shapesnet"]
    n = max(200, 2 * classes)
    x = shapes.render(np.arange(n), num_classes=10, seed=0, split="train")[0].numpy()
    y = np.arange(n) % classes
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = ["--data", str(tmp_path / "d.npz")]
    out = tmp_path / "fixed.pt"
    code, _, err = run_cli("fix", str(ckpt), *model, *data, "--method", "entame", "--new-head", "-o", str(out))
    assert code == 0, err
    code, verdict = _check(out, model, data)
    failed = [c["message"] for c in verdict["checks"] if c["passed"] is False]
    assert code == 0, failed
    noise = {c["name"]: c for c in verdict["checks"]}["max_noise_fraction"]
    assert noise["threshold"] == pytest.approx(2.0 / (classes - 1))
    code, verdict = _check(ckpt, model, [*data, "--new-head"])
    assert {c["name"]: c for c in verdict["checks"]}["max_excess_noise_fraction"]["passed"] is False
