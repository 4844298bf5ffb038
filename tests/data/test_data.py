"""``--data`` resolution, loaders, transforms and every input error of ftdoctor.data."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ftdoctor import shapes
from ftdoctor.data import (IMAGENET_MEAN, IMAGENET_STD, DataBundle, DataOptions, load_data)
from ftdoctor.errors import FtdoctorError

torch.set_num_threads(2)


def _all_batches(bundle: DataBundle, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, idxs = zip(*bundle.loader(**kwargs))
    return torch.cat(xs), torch.cat(ys), torch.cat(idxs)


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- shapes / fake

def test_shapes_bundle_matches_the_renderer_with_imagenet_normalisation() -> None:
    bundle = load_data(DataOptions("shapes:5", split="test", subset="first", max_samples=200, batch_size=32))
    assert (bundle.name, bundle.split, bundle.num_samples, bundle.num_classes) == ("shapes:5", "test", 200, 5)
    assert bundle.image_shape == (3, 32, 32) and bundle.notes == []
    x, y, idx = _all_batches(bundle)
    raw, labels = shapes.render(range(200), num_classes=5, split="test")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
    assert torch.equal(idx, torch.arange(200))
    assert torch.equal(y, labels) and torch.equal(bundle.labels, labels)
    torch.testing.assert_close(x, _imagenet(raw), rtol=0, atol=1e-6)


def test_loader_items_carry_their_dataset_index_under_shuffle() -> None:
    bundle = load_data(DataOptions("shapes", subset="first", max_samples=100, normalize="none"))
    x, y, idx = _all_batches(bundle, batch_size=16, shuffle=True, seed=5)
    assert sorted(idx.tolist()) == list(range(100)) and not torch.equal(idx, torch.arange(100))
    raw, labels = shapes.render(idx)
    assert torch.equal(x, raw) and torch.equal(y, labels)
    again = _all_batches(bundle, batch_size=16, shuffle=True, seed=5)[2]
    other = _all_batches(bundle, batch_size=16, shuffle=True, seed=6)[2]
    assert torch.equal(idx, again) and not torch.equal(idx, other)


def test_single_item_access_matches_the_loader() -> None:
    bundle = load_data(DataOptions("shapes", subset="first", max_samples=10))
    x, y, idx = _all_batches(bundle)
    xi, yi, i = bundle.dataset[7]
    assert i == 7 and yi == int(y[7]) and torch.equal(xi, x[7])


def test_subset_first_takes_the_first_items_in_dataset_order() -> None:
    capped = load_data(DataOptions("shapes", subset="first", max_samples=50, normalize="none"))
    full = load_data(DataOptions("shapes", max_samples=None, normalize="none"))
    assert capped.num_samples == 50 and full.num_samples == shapes.SPLIT_SIZES["train"]
    assert torch.equal(_all_batches(capped)[0], torch.stack([full.dataset[i][0] for i in range(50)]))


def test_default_cap_is_1024_and_loader_is_fast() -> None:
    import time

    start = time.process_time()
    bundle = load_data(DataOptions("shapes"))
    n = sum(len(y) for _, y, _ in bundle.loader())
    assert n == bundle.num_samples == 1024
    assert time.process_time() - start < 3.0  # about 0.2 s on one idle core


def test_image_size_resizes_like_interpolate() -> None:
    bundle = load_data(DataOptions("shapes", subset="first", max_samples=8, image_size=48, normalize="none"))
    assert bundle.image_shape == (3, 48, 48)
    x = _all_batches(bundle)[0]
    expected = F.interpolate(shapes.render(range(8))[0], size=(48, 48), mode="bilinear",
                             align_corners=False, antialias=True)
    torch.testing.assert_close(x, expected)


def test_dataset_normalisation_gives_zero_mean_unit_std_per_channel() -> None:
    bundle = load_data(DataOptions("shapes", subset="first", max_samples=300, normalize="dataset"))
    x = _all_batches(bundle)[0].double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.double),
                               atol=1e-5, rtol=0)
    raw = shapes.render(range(300))[0].double()
    torch.testing.assert_close(torch.tensor(bundle.mean, dtype=torch.double), raw.mean(dim=(0, 2, 3)))
    assert any("per-channel mean" in note for note in bundle.notes)


def test_fake_is_deterministic_with_fixed_sizes() -> None:
    train = load_data(DataOptions("fake", max_samples=None, normalize="none"))
    test = load_data(DataOptions("fake", split="test", max_samples=None, normalize="none"))
    assert (train.num_samples, test.num_samples, train.num_classes) == (1024, 256, 10)
    assert train.image_shape == (3, 32, 32)
    x1, y1, _ = _all_batches(train)
    x2, y2, _ = _all_batches(load_data(DataOptions("fake", max_samples=None, normalize="none")))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.min() >= 0 and x1.max() < 1 and set(y1.tolist()) == set(range(10))
    x3, _, _ = _all_batches(load_data(DataOptions("fake", seed=1, max_samples=None, normalize="none")))
    assert not torch.equal(x1, x3)
    assert not torch.equal(x1[:256], _all_batches(test)[0])
    capped = load_data(DataOptions("fake", subset="first", max_samples=10, normalize="none"))
    assert torch.equal(_all_batches(capped)[0], x1[:10])  # the cap does not reshuffle


def test_fake_image_size_sets_the_generated_size() -> None:
    bundle = load_data(DataOptions("fake", image_size=20, subset="first", max_samples=4))
    assert bundle.image_shape == (3, 20, 20) and _all_batches(bundle)[0].shape == (4, 3, 20, 20)


# --------------------------------------------------------------------------- channels

def test_grey_to_rgb_repeats_the_channel_with_a_note(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    path = tmp_path / "grey.npz"
    np.savez(path, x=grey, y=np.arange(6) % 2)
    bundle = load_data(DataOptions(str(path), normalize="none", in_channels=3))
    assert bundle.image_shape == (3, 8, 8)
    assert bundle.notes == ["grey images repeated to 3 channels for the model's first layer"]
    x = _all_batches(bundle)[0]
    expected = torch.from_numpy(grey).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(x, expected)


def test_rgb_to_grey_averages_with_a_note() -> None:
    bundle = load_data(DataOptions("shapes", subset="first", max_samples=4, normalize="none", in_channels=1))
    assert bundle.image_shape == (1, 32, 32) and "averaged" in bundle.notes[0]
    torch.testing.assert_close(_all_batches(bundle)[0], shapes.render(range(4))[0].mean(1, keepdim=True))


def test_other_channel_mismatch_is_an_error() -> None:
    with pytest.raises(FtdoctorError, match="3 channels but the model's first layer takes 4"):
        load_data(DataOptions("shapes", subset="first", max_samples=4, in_channels=4))


# --------------------------------------------------------------------------- torchvision sets

def _write_cifar10(root: Path, per_batch: int = 4, key=str) -> tuple[np.ndarray, list[int]]:
    """A tiny CIFAR-10 in the real python pickle layout; returns the first batch.

    The real files are Python 2 pickles whose keys torchvision reads back as ``str``
    (``encoding="latin1"``); Python 3 re-exports have ``bytes`` keys: ``key`` picks which.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({key("batch_label"): name, key("data"): data, key("labels"): labels}, f, protocol=2)
        first = first or (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [key(n) for n in names], key("num_vis"): 3072}, f, protocol=2)
    return first


@pytest.mark.parametrize("key", [str, lambda k: k.encode()], ids=["str-keys", "bytes-keys"])
def test_cifar10_in_the_real_pickle_format_loads_through_torchvision(tmp_path: Path, key) -> None:
    # files that cannot match torchvision's md5s: read without the download-time checksum
    data, labels = _write_cifar10(tmp_path, key=key)
    bundle = load_data(DataOptions("cifar10", data_root=str(tmp_path), normalize="none", max_samples=None))
    import torchvision.datasets as tvd

    from ftdoctor.data.torchvision_sets import _cifar_class
    assert issubclass(_cifar_class(tvd.CIFAR10), tvd.CIFAR10)   # torchvision's class, its layout
    assert (bundle.num_samples, bundle.num_classes, bundle.image_shape) == (20, 10, (3, 32, 32))
    x, y, _ = _all_batches(bundle)
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x[:4], expected)
    assert y[:4].tolist() == labels
    test = load_data(DataOptions("cifar10", data_root=str(tmp_path), split="test", subset="first", max_samples=3))
    assert test.num_samples == 3


def test_cifar10_with_a_missing_or_broken_file_is_reported_as_corrupted(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(FtdoctorError) as info:
        load_data(DataOptions("cifar10", data_root=str(tmp_path)))
    assert "corrupted" in info.value.cause
    assert str(tmp_path / "cifar-10-batches-py") in info.value.cause
    assert "--download" in info.value.remedy


def test_missing_torchvision_set_names_the_path_and_download(tmp_path: Path) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(FtdoctorError) as info:
        load_data(DataOptions("cifar100", data_root=str(root)))
    assert str(root / "cifar-100-python") in info.value.cause
    assert "--download" in info.value.remedy and "--data-root" in info.value.remedy
    assert not root.exists()  # nothing was created, nothing downloaded


@pytest.mark.parametrize("name, where", [
    ("cifar10", "cifar-10-batches-py"), ("mnist", os.path.join("MNIST", "raw")),
    ("fashion-mnist", os.path.join("FashionMNIST", "raw")), ("svhn", "test_32x32.mat"),
])
def test_each_torchvision_set_names_where_it_looked(tmp_path: Path, name: str, where: str) -> None:
    with pytest.raises(FtdoctorError) as info:
        load_data(DataOptions(name, data_root=str(tmp_path), split="test"))
    assert f"looked in {tmp_path / where}" in info.value.cause


def test_data_root_defaults_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTDOCTOR_DATA", str(tmp_path))
    with pytest.raises(FtdoctorError, match=str(tmp_path / "MNIST" / "raw")):
        load_data(DataOptions("mnist"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_raw_files_load_as_grey_and_adapt_to_rgb(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    bundle = load_data(DataOptions("mnist", data_root=str(tmp_path), normalize="none", in_channels=3))
    assert bundle.image_shape == (3, 28, 28) and bundle.num_classes == 10
    assert "repeated to 3 channels" in bundle.notes[0]
    x, y, _ = _all_batches(bundle)
    torch.testing.assert_close(x[:, 1], torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()


# --------------------------------------------------------------------------- npz

def test_npz_round_trip_nhwc_uint8_and_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(10, 6, 5, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(10) % 3, x_test=x_test, y_test=np.array([0, 1, 2, 4]))
    bundle = load_data(DataOptions(str(path), normalize="none", batch_size=3))
    assert (bundle.num_samples, bundle.num_classes, bundle.image_shape) == (10, 5, (3, 6, 5))
    got, y, idx = _all_batches(bundle)
    torch.testing.assert_close(got, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == (np.arange(10) % 3).tolist() and idx.tolist() == list(range(10))
    test = load_data(DataOptions(str(path), split="test", normalize="none"))
    assert test.num_classes == 5  # both splits agree on the class count
    torch.testing.assert_close(_all_batches(test)[0], torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255)


def test_npz_round_trip_nchw_float(tmp_path: Path) -> None:
    x = np.random.default_rng(3).normal(size=(7, 3, 4, 4)).astype(np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x=x, y=np.arange(7, dtype=np.int64) % 2)
    bundle = load_data(DataOptions(str(path), normalize="none", subset="first", max_samples=5))
    assert bundle.num_samples == 5 and bundle.num_classes == 2
    assert torch.equal(_all_batches(bundle)[0], torch.from_numpy(x[:5]))


def test_npz_without_test_split_names_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(FtdoctorError, match="no test split.*train only"):
        load_data(DataOptions(str(path), split="test"))


def test_npz_missing_arrays_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), targets=np.zeros(2))
    with pytest.raises(FtdoctorError, match="it has: images, targets"):
        load_data(DataOptions(str(path)))


@pytest.mark.parametrize("labels, message", [
    (np.array([0, -1, 1]), "label -1 is negative"),
    (np.array([0.0, 1.5, 1.0]), "non-integer"),
    (np.array([0, 1]), "3 images but y has 2 labels"),
    (np.eye(3), "one class index per image"),
])
def test_npz_bad_labels(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    path = tmp_path / "b.npz"
    np.savez(path, x=np.zeros((3, 4, 4), np.uint8), y=labels)
    with pytest.raises(FtdoctorError, match=message):
        load_data(DataOptions(str(path)))


def test_labels_out_of_range_of_a_stated_class_count(tmp_path: Path) -> None:
    path = tmp_path / "r.npz"
    np.savez(path, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 2, 5]), num_classes=3)
    with pytest.raises(FtdoctorError, match="label 5 is out of range for 3 classes"):
        load_data(DataOptions(str(path)))
    # checks run on the capped labels only
    assert load_data(DataOptions(str(path), subset="first", max_samples=2)).num_classes == 3


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.npz"
    np.savez(path, x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(FtdoctorError, match="no samples"):
        load_data(DataOptions(str(path)))


def test_corrupt_npz_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(FtdoctorError, match="cannot read"):
        load_data(DataOptions(str(path)))


def test_npz_with_unknown_image_layout_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "l.npz"
    np.savez(path, x=np.zeros((2, 5, 5, 5), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(FtdoctorError, match="cannot tell images"):
        load_data(DataOptions(str(path)))


# --------------------------------------------------------------------------- hdf5

def _write_h5(path: Path, **arrays: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


def test_h5_round_trip_nhwc_uint8_with_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(12, 5, 5, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(3, 5, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.h5"
    _write_h5(path, images=images, labels=np.arange(12) % 4, test_images=test_images,
              test_labels=np.array([1, 2, 3]))
    bundle = load_data(DataOptions(str(path), normalize="none", subset="first", max_samples=9, batch_size=4))
    assert (bundle.num_samples, bundle.num_classes, bundle.image_shape) == (9, 4, (3, 5, 5))
    x, y, _ = _all_batches(bundle, shuffle=True, seed=1)  # shuffled: non-contiguous reads
    order = _all_batches(bundle, shuffle=True, seed=1)[2].numpy()
    torch.testing.assert_close(x, torch.from_numpy(images[order]).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == (order % 4).tolist()
    test = load_data(DataOptions(str(path), split="test", normalize="none"))
    torch.testing.assert_close(_all_batches(test)[0], torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255)


def test_h5_round_trip_nchw_float_with_a_worker(tmp_path: Path) -> None:
    images = np.random.default_rng(5).normal(size=(6, 1, 4, 4)).astype(np.float32)
    path = tmp_path / "f.hdf5"
    _write_h5(path, images=images, labels=np.array([0, 1, 0, 1, 0, 1]))
    bundle = load_data(DataOptions(str(path), normalize="none", workers=1, batch_size=4))
    assert bundle.image_shape == (1, 4, 4)
    assert torch.equal(_all_batches(bundle)[0], torch.from_numpy(images))


def test_h5_without_images_names_its_datasets(tmp_path: Path) -> None:
    path = tmp_path / "n.h5"
    _write_h5(path, pixels=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(FtdoctorError, match="it has: labels, pixels"):
        load_data(DataOptions(str(path)))


def test_h5_without_test_split_says_so(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    _write_h5(path, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(FtdoctorError, match="no test split"):
        load_data(DataOptions(str(path), split="test"))


def test_h5_negative_label_and_stated_class_count(tmp_path: Path) -> None:
    path = tmp_path / "neg.h5"
    _write_h5(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, -2]))
    with pytest.raises(FtdoctorError, match="label -2 is negative"):
        load_data(DataOptions(str(path)))
    stated = tmp_path / "stated.h5"
    _write_h5(stated, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 1]))
    with h5py.File(stated, "a") as f:
        f.attrs["num_classes"] = 7
    assert load_data(DataOptions(str(stated))).num_classes == 7


def test_corrupt_h5_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(FtdoctorError, match="cannot read .* as HDF5"):
        load_data(DataOptions(str(path)))


# --------------------------------------------------------------------------- directories

def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    cat = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    dog = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    _write_png(tmp_path / "cat" / "a.png", cat)
    _write_png(tmp_path / "dog" / "b.png", dog)
    bundle = load_data(DataOptions(str(tmp_path), normalize="none"))
    assert (bundle.num_samples, bundle.num_classes, bundle.image_shape) == (2, 2, (3, 6, 7))
    x, y, _ = _all_batches(bundle)
    expected = torch.from_numpy(np.stack([cat, dog])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [0, 1]
    with pytest.raises(FtdoctorError, match="only a train split"):
        load_data(DataOptions(str(tmp_path), split="test"))


def test_image_folder_with_split_subfolders(tmp_path: Path) -> None:
    pixel = np.full((4, 4, 3), 200, dtype=np.uint8)
    for name in ("train/a/0.png", "train/b/0.png", "train/b/1.png", "test/b/0.png"):
        _write_png(tmp_path / name, pixel)
    test = load_data(DataOptions(str(tmp_path), split="test"))
    assert test.num_samples == 1 and test.num_classes == 2
    assert test.labels.tolist() == [1]  # "b" keeps the train split's index


def test_image_folder_missing_split_names_the_existing_one(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FtdoctorError, match="no test split: it has train/"):
        load_data(DataOptions(str(tmp_path), split="test"))


def test_image_folder_resizes_to_the_first_image_with_a_note(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _write_png(tmp_path / "a" / "1.png", np.zeros((8, 6, 3), np.uint8))
    _write_png(tmp_path / "b" / "0.png", np.zeros((5, 5, 3), np.uint8))
    bundle = load_data(DataOptions(str(tmp_path)))
    assert bundle.image_shape == (3, 4, 4) and _all_batches(bundle)[0].shape == (3, 3, 4, 4)
    assert any("first image" in note for note in bundle.notes)


def test_empty_image_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(FtdoctorError, match="no samples"):
        load_data(DataOptions(str(tmp_path)))
    with pytest.raises(FtdoctorError, match="no class subfolders"):
        load_data(DataOptions(str(tmp_path / "a")))


# --------------------------------------------------------------------------- options and names

@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "batch size"),
    (dict(subset="first", max_samples=0), "sample cap"),
    (dict(subset="random"), "unknown --subset"),
    (dict(image_size=0), "image size"),
    (dict(image_size=-3), "image size"),
    (dict(split="val"), "unknown split"),
    (dict(normalize="minmax"), "unknown normalization"),
    (dict(workers=-1), "worker count"),
])
def test_bad_options_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(FtdoctorError, match=message):
        load_data(DataOptions("shapes", **options))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(FtdoctorError) as info:
        load_data(DataOptions("imagenet21k"))
    for name in ("shapes", "fake", "cifar10", "cifar100", "mnist", "fashion-mnist", "svhn"):
        assert name in info.value.remedy


def test_missing_file_and_unsupported_file(tmp_path: Path) -> None:
    with pytest.raises(FtdoctorError, match="not found"):
        load_data(DataOptions(str(tmp_path / "absent.h5")))
    other = tmp_path / "data.xls"
    other.write_text("1,2,3\n")
    with pytest.raises(FtdoctorError, match="unknown file type"):
        load_data(DataOptions(str(other)))
    empty = tmp_path / "data.csv"          # a table with a header and no rows
    empty.write_text("text,label\n")
    with pytest.raises(FtdoctorError, match="no rows"):
        load_data(DataOptions(str(empty)))


def test_bad_shapes_class_count() -> None:
    for data in ("shapes:1", "shapes:11", "shapes:ten"):
        with pytest.raises(FtdoctorError, match="shapes"):
            load_data(DataOptions(data))
