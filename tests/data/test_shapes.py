"""The built-in ``shapes`` set: determinism, the tasks, and that it can be learned."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ftdoctor import shapes
from ftdoctor.errors import FtdoctorError

torch.set_num_threads(2)


def test_same_seed_gives_bit_identical_images() -> None:
    a, ya = shapes.render(range(64), seed=3)
    b, yb = shapes.render(range(64), seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_different_seed_gives_different_images() -> None:
    a, _ = shapes.render(range(64), seed=0)
    b, _ = shapes.render(range(64), seed=1)
    per_image_diff = (a - b).abs().flatten(1).amax(1)
    assert (per_image_diff > 0.1).all()


def test_train_and_test_splits_share_no_image() -> None:
    train, _ = shapes.render(range(512), split="train")
    test, _ = shapes.render(range(512), split="test")
    distance = torch.cdist(train.flatten(1), test.flatten(1))
    assert distance.min() > 1.0


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, shapes.SPLIT_SIZES["test"] - 1), min_size=1, max_size=20),
       st.sampled_from([2, 5, 10]))
def test_an_image_does_not_depend_on_its_batch(indices: list[int], num_classes: int) -> None:
    batch, labels = shapes.render(indices, num_classes=num_classes, split="test")
    for row, i in enumerate(indices):
        single, label = shapes.render([i], num_classes=num_classes, split="test")
        assert torch.equal(batch[row], single[0]) and labels[row] == label[0]


def test_images_are_rgb_32_in_unit_range() -> None:
    x, y = shapes.render(range(100))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.std() > 0.1  # not blank


@pytest.mark.parametrize("num_classes", [2, 5, 9, 10])
def test_class_count_and_labels_in_range(num_classes: int) -> None:
    ds = shapes.ShapesDataset(num_classes=num_classes, split="train")
    labels = ds.targets
    assert len(ds) == shapes.SPLIT_SIZES["train"] == len(labels)
    assert labels.min() == 0 and labels.max() == num_classes - 1
    counts = torch.bincount(labels, minlength=num_classes).float()
    assert counts.min() > 0.7 * counts.mean()  # roughly balanced
    assert len(shapes.class_names(num_classes)) == num_classes


def test_labels_without_rendering_match_rendered_labels() -> None:
    for num_classes in (5, 10):
        _, rendered = shapes.render(range(300), num_classes=num_classes, seed=7)
        assert torch.equal(shapes.labels(range(300), num_classes=num_classes, seed=7), rendered)


def test_source_and_target_tasks_differ() -> None:
    assert shapes.is_source_task(10) and not shapes.is_source_task(5)
    assert set(shapes.class_names(5)).isdisjoint(shapes.class_names(10))


def test_dataset_items_match_batch_render() -> None:
    ds = shapes.ShapesDataset(num_classes=5, split="test", seed=2, size=40)
    x, y = ds.render([0, 39, 7])
    for row, i in enumerate([0, 39, 7]):
        xi, yi = ds[i]
        assert torch.equal(xi, x[row]) and yi == int(y[row])
    assert len(ds) == 40
    with pytest.raises(IndexError):
        ds[40]


@pytest.mark.parametrize("bad", [0, 1, 11, 100])
def test_bad_class_count_is_a_usage_error(bad: int) -> None:
    with pytest.raises(FtdoctorError, match="shapes"):
        shapes.ShapesDataset(num_classes=bad)


def test_bad_split_is_a_usage_error() -> None:
    with pytest.raises(FtdoctorError, match="split"):
        shapes.render([0], split="validation")


def test_rendering_is_vectorised_and_fast() -> None:
    start = time.process_time()
    shapes.render(range(1024))
    # about 0.1 s of CPU on one core; a per-pixel Python loop would take minutes
    assert time.process_time() - start < 3.0


def _small_cnn(num_classes: int, width: int = 16) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.MaxPool2d(2), *block(4 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def test_shapes_is_learnable_by_a_small_cnn_in_seconds() -> None:
    """6 epochs of a 4-conv net on the 4096 training images: ≥ 90 % on the 1024 test images.

    A fixed number of steps keeps the result independent of machine load;
    on two idle cores the training takes about 12 s.
    """
    torch.manual_seed(0)
    x_train, y_train = shapes.render(range(shapes.SPLIT_SIZES["train"]), split="train")
    x_test, y_test = shapes.render(range(shapes.SPLIT_SIZES["test"]), split="test")
    x_train, x_test = (x_train - 0.3) / 0.3, (x_test - 0.3) / 0.3
    net = _small_cnn(10)
    epochs, batch = 6, 64
    steps = epochs * (len(y_train) // batch)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for b in range(0, len(order) - batch + 1, batch):
            idx = order[b:b + batch]
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    print(f"shapes:10 test accuracy {accuracy:.4f} after {seconds:.1f} s of training")
    assert accuracy >= 0.90
