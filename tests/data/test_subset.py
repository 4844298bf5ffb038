"""``--max-samples N`` keeps a seeded, class-stratified subset; ``--subset first`` the first N."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ftdoctor.data import DataOptions, load_data
from ftdoctor.data.subset import stratified_indices
from helpers import run_cli


@pytest.fixture()
def sorted_folder(tmp_path: Path) -> Path:
    """An ImageFolder of 4 classes (30, 30, 20, 20 images): listed class by class, as torchvision does."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c, count in enumerate((30, 30, 20, 20)):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def test_a_class_sorted_folder_is_seen_in_proportion(sorted_folder):
    bundle = load_data(DataOptions(data=str(sorted_folder), max_samples=20, normalize="none"))
    assert np.bincount(bundle.labels.numpy(), minlength=4).tolist() == [6, 6, 4, 4]
    first = load_data(DataOptions(data=str(sorted_folder), max_samples=20, normalize="none", subset="first"))
    assert np.bincount(first.labels.numpy(), minlength=4).tolist() == [20, 0, 0, 0]
    assert bundle.drawn.describe() == "20 of 100 examples, every class in proportion (seed 0)"
    assert "first 20" in first.drawn.describe()


def test_the_draw_depends_on_the_seed_only(sorted_folder):
    def picked(**kw):
        bundle = load_data(DataOptions(data=str(sorted_folder), max_samples=20, normalize="none", **kw))
        return [int(i) for i in bundle.dataset.source.indices]

    assert picked(seed=0) == picked(seed=0, batch_size=3) == picked(seed=0, workers=1)
    assert picked(seed=0) != picked(seed=1)
    assert picked(seed=0) == sorted(picked(seed=0))      # kept in dataset order


def test_stratified_indices_against_the_largest_remainder_rule():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    for n in (1, 7, 10, 33, 99):
        idx = stratified_indices(labels, n, seed=3)
        counts = np.bincount(labels[idx], minlength=3)
        exact = np.array([50, 30, 20]) * n / 100
        assert counts.sum() == n and len(set(idx.tolist())) == n
        assert np.all(np.abs(counts - exact) < 1)                       # within one of its share
    assert stratified_indices(labels, 100, seed=0).tolist() == list(range(100))
    # within a class every member is equally likely: over many seeds each is picked ≈ n_c / m_c of the time
    hits = np.zeros(100)
    for seed in range(400):
        hits[stratified_indices(labels, 10, seed)] += 1
    assert np.allclose(hits[:50] / 400, 5 / 50, atol=0.05)


def test_the_report_says_how_the_examples_were_drawn(sorted_folder, tmp_path):
    import torch

    from ftdoctor.zoo import ShapesNet

    torch.manual_seed(0)
    ckpt = tmp_path / "net.pt"
    torch.save(ShapesNet(num_classes=4).state_dict(), ckpt)
    arch = ["--arch", "ftdoctor.zoo:ShapesNet", "--image-size", "32"]
    code, out, err = run_cli("probe", str(ckpt), *arch, "--data", str(sorted_folder), "--max-samples", "20",
                             "--probes", "noise", "--format", "json")
    assert code == 0, err
    data = json.loads(out)["data"]
    assert data["subset"] == {"mode": "stratified", "kept": 20, "total": 100, "seed": 0}
    code, out, err = run_cli("probe", str(ckpt), *arch, "--data", str(sorted_folder), "--max-samples", "20",
                             "--probes", "noise")
    assert "20 of 100 examples, every class in proportion" in " ".join(out.split())


def test_an_npz_subset_decompresses_the_drawn_rows(tmp_path):
    """Image i holds the value i: the rows read are exactly the drawn ones (streamed, not the whole array)."""
    n = 300
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 3, 4, 4)).copy()
    y = np.repeat(np.arange(3), 100)                                  # sorted by class
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    bundle = load_data(DataOptions(data=str(tmp_path / "d.npz"), max_samples=30, normalize="none"))
    images = bundle.dataset.prepare(list(range(30)), normalize=False)
    picked = images[:, 0, 0, 0].long().tolist()
    assert picked == sorted(picked) and np.bincount(y[picked], minlength=3).tolist() == [10, 10, 10]
    assert bundle.labels.tolist() == y[picked].tolist()
