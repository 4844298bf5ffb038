"""Only regular files are read: FIFOs, devices and link loops are refused at once, never waited on (SPEC §8).

Each case runs under a watchdog (SIGALRM): a regression fails the test instead of hanging the suite.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from hostile import ARCH, SMALL, assert_clean, run


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


@pytest.mark.parametrize("make", [
    lambda d: _fifo(d / "model.pt"),
    lambda d: _link(d / "model.pt", "/dev/zero"),
    lambda d: _link(d / "model.safetensors", "/dev/urandom"),
    lambda d: Path("/dev/urandom"),
], ids=["fifo", "link-to-dev-zero", "link-to-dev-urandom", "dev-urandom"])
def test_a_model_that_is_not_a_regular_file_is_refused_at_once(nets_dir, make):
    model = make(nets_dir)
    o = run(nets_dir, "probe", model, *ARCH, "--data", "shapes:10", *SMALL)
    assert_clean(o, 2, mentions=("not a regular file",))   # at once: a read would block or never end


def test_check_on_a_directory_of_special_files_fails_their_loadable_check(good_model, nets_dir):
    exports = nets_dir / "exports"
    exports.mkdir()
    _fifo(exports / "a.pt")
    _link(exports / "b.pt", "/dev/zero")
    _link(exports / "c.ckpt", "/dev/urandom")
    (exports / "good.pt").write_bytes(good_model.read_bytes())
    o = run(nets_dir, "check", exports, *ARCH, "--format", "json")
    assert_clean(o, 1)
    import json
    verdicts = {Path(c["path"]).name: c for c in json.loads(o.out)["checkpoints"]}
    assert verdicts["good.pt"]["passed"]
    for name in ("a.pt", "b.pt", "c.ckpt"):
        checks = {c["name"]: c for c in verdicts[name]["checks"]}
        assert checks["loadable"]["passed"] is False and "not a regular file" in checks["loadable"]["message"]
        assert "not a regular file" in checks["pickle_safe"]["message"]     # never read, said so


def _png(path: Path, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)


@pytest.mark.parametrize("make", [
    lambda d: _fifo(d / "b" / "x.png"),
    lambda d: _link(d / "b" / "x.png", "/dev/urandom"),
    lambda d: _link(d / "b" / "x.png", "/dev/zero"),
], ids=["fifo", "link-to-dev-urandom", "link-to-dev-zero"])
def test_an_image_folder_holding_a_special_file_is_refused(good_model, nets_dir, make):
    folder = nets_dir / "imgs"
    for c in "ab":
        _png(folder / c / "0.png")
    make(folder)
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("x.png", "not a regular file"))


def test_a_symlink_loop_in_an_image_folder_is_walked_once(good_model, nets_dir):
    folder = nets_dir / "imgs"
    for c in "ab":
        _png(folder / c / "0.png")
    _link(folder / "a" / "loop", "..")          # a/loop -> imgs: os.walk(followlinks=True) would cycle
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", *SMALL, "--format", "json")
    assert_clean(o, 0)


def test_hdf5_external_storage_pointing_at_a_device_is_refused(good_model, nets_dir):
    path = nets_dir / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", shape=(16, 8, 8, 3), dtype="u1", external=[("/dev/zero", 0, 16 * 8 * 8 * 3)])
        f["labels"] = np.arange(16) % 2
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("external storage",))


def test_hdf5_external_links_and_virtual_datasets_are_refused(good_model, nets_dir):
    other = nets_dir / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((16, 8, 8, 3), np.uint8)
    linked = nets_dir / "linked.h5"
    with h5py.File(linked, "w") as f:
        f["images"] = h5py.ExternalLink(str(other), "images")
        f["labels"] = np.arange(16) % 2
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", linked, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("external link",))
    virtual = nets_dir / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(16, 8, 8, 3), dtype="u1")
    layout[:] = h5py.VirtualSource(str(other), "images", shape=(16, 8, 8, 3))
    with h5py.File(virtual, "w") as f:
        f.create_virtual_dataset("images", layout)
        f["labels"] = np.arange(16) % 2
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", virtual, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("virtual dataset",))


@pytest.mark.parametrize("flag", ["--data", "--reference", "--config"])
def test_a_fifo_given_as_data_reference_or_config_is_refused(good_model, nets_dir, flag):
    name = {"--data": "d.npz", "--reference": "ref.pt", "--config": "ftdoctor.toml"}[flag]
    special = _fifo(nets_dir / name)
    if flag == "--config":
        o = run(nets_dir, "check", good_model, *ARCH, "--config", special)
    else:
        extra = ("--data", "shapes:10") if flag == "--reference" else ("--new-head",)
        o = run(nets_dir, "probe", good_model, *ARCH, flag, special, *extra, *SMALL)
    assert_clean(o, 2, mentions=("not a regular file",))


def test_plot_of_a_fifo_is_refused(nets_dir):
    pytest.importorskip("matplotlib")
    o = run(nets_dir, "plot", _fifo(nets_dir / "trace.h5"), "-o", nets_dir / "t.png")
    assert_clean(o, 2, mentions=("not a regular file",))
