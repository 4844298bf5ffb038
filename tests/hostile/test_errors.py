"""Errors that tell the truth: the real cause and a remedy, never "unexpected ..." for user input (SPEC §8)."""
from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hostile import ARCH, SMALL, assert_clean, run


def test_dataloader_workers_pass_the_real_cause_through(good_model, nets_dir):
    folder = nets_dir / "imgs"
    for c in "ab":
        (folder / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(folder / c / f"{i}.png")
    (folder / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", "--workers", "2",
            "--batch-size", "2", "--quiet")
    assert_clean(o, 2, mentions=("2.png", "cannot read image"))


def test_device_meta_is_refused_with_a_remedy(good_model, nets_dir):
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", "shapes:10", *SMALL, "--device", "meta")
    assert_clean(o, 2, mentions=("--device cpu",))


def test_nan_images_in_hdf5_are_unusable_data_for_probe_and_check(good_model, nets_dir):
    path = nets_dir / "nan.h5"
    images = np.random.default_rng(0).random((16, 3, 8, 8)).astype(np.float32)
    images[5, 0, 0, 0] = np.nan
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = np.arange(16) % 10
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--normalize", "none", *SMALL)
    assert_clean(o, 2, mentions=("NaN",))
    o = run(nets_dir, "check", good_model, *ARCH, "--data", path, "--normalize", "none")
    assert_clean(o, 2, mentions=("NaN",))           # the data's fault, not a failed check of the weights


def test_fix_on_nan_weights_says_so(good_model, nets_dir):
    sd = torch.load(good_model)
    sd["features.3.weight"][0, 0, 0, 0] = float("nan")
    path = nets_dir / "nan.pt"
    torch.save(sd, path)
    for method in ("entame", "rifle", "rescale", "datadep"):
        o = run(nets_dir, "fix", path, *ARCH, "--method", method, "--data", "shapes:10", *SMALL, "-o", "o.pt")
        assert_clean(o, 2, mentions=("NaN or Inf", "features.3.weight"))


@pytest.mark.parametrize("command", ["probe", "fix", "check", "trace", "compare"])
def test_one_class_data_is_exit_2_for_every_command(good_model, nets_dir, command):
    path = nets_dir / "one.npz"
    np.savez(path, x=np.zeros((8, 8, 8, 3), np.uint8), y=np.zeros(8, np.int64), x_test=np.zeros((4, 8, 8, 3),
             np.uint8), y_test=np.zeros(4, np.int64))
    args = {"probe": ("--new-head", *SMALL), "fix": ("--method", "rifle", "--new-head", "-o", "o.pt", "--quiet"),
            "check": ("--new-head",), "trace": ("--steps", "2", "--quiet", "--hdf5", "t.h5"),
            "compare": ("--steps", "2", "--seeds", "1", "--quiet", "--hdf5", "c.h5")}[command]
    o = run(nets_dir, command, good_model, *ARCH, "--data", path, *args)
    assert_clean(o, 2, mentions=("single class",))
