"""Small files may not make ftdoctor allocate gigabytes: declared sizes are checked first (SPEC §8).

Each case's peak memory growth is measured (VmHWM, reset before the run) and bounded.
"""
from __future__ import annotations

import io
import zipfile
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hostile import ARCH, SMALL, assert_clean, run

BOUND_MB = 600    # what a refused bomb may cost at most (the refusals cost a few MB)


def test_a_stride_zero_head_is_refused(good_model, nets_dir):
    sd = torch.load(good_model)
    sd["fc.weight"] = torch.zeros(()).expand(100_000, 32)       # 12.8 MB once copied, 4 bytes stored
    sd["fc.bias"] = torch.zeros(()).expand(100_000)
    path = nets_dir / "stride0.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 20_000
    o = run(nets_dir, "probe", path, *ARCH, "--data", "shapes:10", *SMALL)
    assert_clean(o, 2, mentions=("repeats its storage",), growth_mb=BOUND_MB)
    o = run(nets_dir, "check", path, *ARCH)
    assert_clean(o, 1, mentions=("repeats its storage",), growth_mb=BOUND_MB)


def test_a_deflated_zip_bomb_checkpoint_is_refused(good_model, nets_dir):
    """torch.save's zip, one storage entry re-written deflated and declaring 400 MB of zeros."""
    path = nets_dir / "bomb.pt"
    with zipfile.ZipFile(good_model) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(entry, "w", force_zip64=True) as out:
                    block = bytes(1 << 20)
                    for _ in range(400):
                        out.write(block)
            else:
                dst.writestr(info, data)
    assert path.stat().st_size < 3_000_000
    o = run(nets_dir, "probe", path, *ARCH, "--data", "shapes:10", *SMALL)
    assert_clean(o, 2, mentions=("decompression",), growth_mb=BOUND_MB)


def test_a_legacy_checkpoint_declaring_a_huge_storage_is_refused(nets_dir):
    """A legacy (non-zip) torch.save whose pickle names a 2·10⁹-element storage: torch would allocate 8 GB
    before noticing that the file is short."""
    buf = io.BytesIO()
    torch.save(OrderedDict(w=torch.arange(10, dtype=torch.float32)), buf, _use_new_zipfile_serialization=False)
    raw = bytearray(buf.getvalue())
    # the persistent id ('storage', FloatStorage, key, 'cpu', numel=10): numel is a BININT1 10 after 'cpu'
    cpu = raw.index(b"cpu")
    at = raw.index(b"K\x0a", cpu)
    raw[at:at + 2] = b"J" + (2_000_000_000).to_bytes(4, "little")
    path = nets_dir / "legacy_bomb.pt"
    path.write_bytes(bytes(raw))
    o = run(nets_dir, "inspect", path, *ARCH)
    assert_clean(o, 2, mentions=("declares",), growth_mb=BOUND_MB)


def test_a_complex_checkpoint_is_refused_not_cast(good_model, nets_dir):
    sd = torch.load(good_model)
    sd["fc.weight"] = sd["fc.weight"].to(torch.complex64)
    path = nets_dir / "complex.pt"
    torch.save(sd, path)
    o = run(nets_dir, "inspect", path, *ARCH)
    assert_clean(o, 2, mentions=("complex",))


def test_an_npz_of_compressed_zeros_reads_only_the_rows_it_needs(good_model, nets_dir):
    path = nets_dir / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((8000, 64, 64, 3), np.uint8), y=np.arange(8000) % 10)   # 98 MB raw
    assert path.stat().st_size < 1_000_000
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--max-samples", "8", "--quiet",
            "--probes", "noise", "--format", "json")
    assert_clean(o, 0, growth_mb=80)


def test_an_npz_declaring_too_many_labels_is_refused(good_model, nets_dir):
    path = nets_dir / "labels.npz"
    np.savez_compressed(path, x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(40_000_000, np.int64))   # 320 MB
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--max-samples", "8", "--quiet")
    assert_clean(o, 2, mentions=("more than ftdoctor reads",), growth_mb=BOUND_MB)


@pytest.mark.parametrize("where", ["npz", "h5-attribute"])
def test_a_huge_class_count_is_refused(good_model, nets_dir, where):
    if where == "npz":
        path = nets_dir / "classes.npz"
        np.savez(path, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 10**9]))
    else:
        path = nets_dir / "classes.h5"
        with h5py.File(path, "w") as f:
            f["images"] = np.zeros((4, 8, 8, 3), np.uint8)
            f["labels"] = np.arange(4) % 2
            f.attrs["num_classes"] = 10**9
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("classes",), growth_mb=BOUND_MB)


def test_hdf5_chunks_too_large_to_decompress_are_refused(good_model, nets_dir):
    path = nets_dir / "chunks.h5"
    with h5py.File(path, "w") as f:      # nothing written: a tiny file declaring 400 MB chunks
        f.create_dataset("images", shape=(8000, 128, 128, 3), dtype="u1", chunks=(8000, 128, 128, 3),
                         compression="gzip")
        f["labels"] = np.arange(8000) % 2
    assert path.stat().st_size < 200_000
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("chunks",), growth_mb=BOUND_MB)


def test_a_huge_first_image_asks_for_image_size(good_model, nets_dir):
    folder = nets_dir / "imgs"
    for c in "ab":
        (folder / c).mkdir(parents=True)
    Image.new("L", (6000, 6000)).save(folder / "a" / "0.png")         # ~35 KB on disk
    Image.new("L", (8, 8)).save(folder / "b" / "0.png")
    assert (folder / "a" / "0.png").stat().st_size < 100_000
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", "--quiet")
    assert_clean(o, 2, mentions=("--image-size",), growth_mb=BOUND_MB)
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", "--quiet", "--image-size", "16",
            "--format", "json")
    assert_clean(o, 0)      # a large image, decoded one at a time when a size is asked for


def test_a_decompression_bomb_image_is_refused_before_decoding(good_model, nets_dir):
    folder = nets_dir / "imgs"
    for c in "ab":
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / c / "0.png")
    Image.new("1", (20_000, 20_000)).save(folder / "b" / "1.png")      # 400 M pixels, a few KB
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", folder, "--new-head", "--quiet", "--image-size", "8")
    assert_clean(o, 2, mentions=("1.png", "pixels"), growth_mb=BOUND_MB)


def test_huge_stored_images_in_an_npz_are_refused(good_model, nets_dir):
    path = nets_dir / "wide.npz"
    with zipfile.ZipFile(path, "w") as z:       # a header declaring 2 images of 20000×20000, no data
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (2, 20000, 20000, 3)})
        z.writestr("x.npy", header.getvalue())
        y = io.BytesIO()
        np.save(y, np.array([0, 1]))
        z.writestr("y.npy", y.getvalue())
    o = run(nets_dir, "probe", good_model, *ARCH, "--data", path, "--new-head", *SMALL)
    assert_clean(o, 2, mentions=("pixels",), growth_mb=BOUND_MB)
