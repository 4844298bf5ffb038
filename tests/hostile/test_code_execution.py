"""No file runs code without --trust-checkpoint: checkpoints, CIFAR data pickles, TorchScript (SPEC §8)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import ARCH, CANARY, PAYLOAD, SMALL, Evil, assert_clean, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_extra_beside_a_state_dict_is_refused_and_runs_nothing(good_model, nets_dir, legacy):
    """The extra's pickle calls io.open: every command refuses the file naming it (check fails pickle_safe);
    nothing runs, nothing is written."""
    evil = nets_dir / "evil.pt"
    torch.save({"state_dict": torch.load(good_model), "x": Evil(nets_dir / CANARY)}, evil,
               _use_new_zipfile_serialization=not legacy)
    assert_clean(run(nets_dir, "probe", evil, *ARCH, "--data", "shapes:10", *SMALL), 2,
                 mentions=("io.open (REDUCE", "--trust-checkpoint"))
    assert_clean(run(nets_dir, "inspect", evil, *ARCH), 2, mentions=("io.open", "ftdoctor check"))
    assert_clean(run(nets_dir, "check", evil, *ARCH), 1, mentions=("pickle_safe", "io.open"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_pickle_without_a_state_dict_is_refused_naming_the_global(nets_dir, legacy):
    evil = nets_dir / "evil.pt"
    torch.save(Evil(nets_dir / CANARY), evil, _use_new_zipfile_serialization=not legacy)
    for command in (("probe", evil, *ARCH, "--data", "shapes:10", *SMALL), ("inspect", evil, *ARCH)):
        o = run(nets_dir, *command)
        assert_clean(o, 2, mentions=("open", "--trust-checkpoint"))
    o = run(nets_dir, "check", evil, *ARCH)
    assert_clean(o, 1, mentions=("loadable",))


def _cifar(root: Path, folder: str, batches: list[str], meta: str, meta_key: str, label_key: str) -> Path:
    """A tiny CIFAR in its real layout (protocol-2 pickles with numpy arrays, as torchvision reads)."""
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in batches:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         label_key: [0, 1, 2, 3]}, f, protocol=2)
    with open(d / meta, "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(100 if "100" in folder else 10)]}, f, protocol=2)
    return d


CIFAR10 = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
           "label_names", "labels")
CIFAR100 = ("cifar-100-python", ["train", "test"], "meta", "fine_label_names", "fine_labels")


@pytest.mark.parametrize("dataset, layout, poisoned", [
    ("cifar10", CIFAR10, "data_batch_1"),
    ("cifar10", CIFAR10, "batches.meta"),
    ("cifar100", CIFAR100, "train"),
    ("cifar100", CIFAR100, "meta"),
])
def test_a_malicious_pickle_in_a_cifar_data_root_runs_nothing(good_model, nets_dir, dataset, layout, poisoned):
    data_root = nets_dir / "data"
    folder = _cifar(data_root, *layout)
    with open(folder / poisoned, "wb") as f:
        pickle.dump({"data": Evil(nets_dir / CANARY), "labels": [0]}, f, protocol=2)
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", dataset, "--data-root", data_root, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=(poisoned, "io.open", "not loaded"))
    o = run(nets_dir, "check", good_model, *ARCH, "--data", dataset, "--data-root", data_root, "--new-head")
    assert_clean(o, 2, mentions=(poisoned,))


def test_the_genuine_cifar_layout_still_loads(good_model, nets_dir):
    data_root = nets_dir / "data"
    _cifar(data_root, *CIFAR10)
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", "cifar10", "--data-root", data_root, *SMALL,
            "--format", "json")
    assert_clean(o, 0)
    assert '"num_samples": 20' in o.out


def test_torchscript_runs_nothing_without_trust(nets_dir):
    import sys
    canary = nets_dir / CANARY
    (nets_dir / "ftd_payload.py").write_text(PAYLOAD.replace("CANARY", str(canary)))
    sys.path.insert(0, str(nets_dir))
    try:
        import ftd_payload
        scripted = torch.jit.script(ftd_payload.Evil())
    finally:
        sys.path.remove(str(nets_dir))
        sys.modules.pop("ftd_payload", None)
    ts = nets_dir / "evil_ts.pt"
    scripted.save(str(ts))
    assert not canary.exists()
    o = run(nets_dir, "probe", ts, "--data", "shapes:10", *SMALL)
    assert_clean(o, 2, mentions=("TorchScript", "--trust-checkpoint", "not loaded"))
    o = run(nets_dir, "check", ts)                     # a checkpoint's own problem: a failed check
    assert_clean(o, 1, mentions=("loadable", "TorchScript"))
    o = run(nets_dir, "inspect", ts)
    assert_clean(o, 2, mentions=("--trust-checkpoint",))
    # the payload is real: with the flag, the user vouches for the file, and it runs
    run(nets_dir, "inspect", ts, "--trust-checkpoint", "--quiet")
    assert canary.exists()


def test_under_an_old_torch_pickles_are_refused(good_model, nets_dir, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    o = run(nets_dir, "inspect", good_model, *ARCH)
    assert_clean(o, 2, mentions=("CVE-2025-32434", "2.6"))
    st = nets_dir / "good.safetensors"
    save_file(torch.load(good_model), st)
    o = run(nets_dir, "inspect", st, *ARCH, "--quiet")      # no pickle: still readable
    assert o.code == 0, o.err


def test_the_package_requires_a_safe_torch():
    import tomllib
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps and any(d.startswith("torchvision>=0.21") for d in deps)
