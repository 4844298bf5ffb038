"""The probes' float64 sums fed at float32 precision: Float64Sum and sum_of_squares against float64 truth."""
from __future__ import annotations

import pytest
import torch

from ftdoctor.engine.sums import Float64Sum, distance_sum_of_squares, sum_of_squares


@pytest.mark.parametrize("block", [1, 3, 16])
def test_float64_sum_matches_float64_truth(block):
    g = torch.Generator().manual_seed(0)
    addends = [torch.randn(7, 5, generator=g) * 10 ** torch.randint(-3, 3, (1,), generator=g).item()
               for _ in range(41)]   # 41: the last block is partial
    acc, sq = Float64Sum((7, 5), block=block), Float64Sum((7, 5), block=block)
    for t in addends:
        acc.add_(t)
        sq.add_square_(t)
    truth = torch.stack([t.double() for t in addends])
    assert acc.value().dtype == torch.float64
    scale = truth.abs().sum(0)   # rounding is relative to the addends' magnitudes
    assert ((acc.value() - truth.sum(0)).abs() / scale).max() < 2e-6
    assert ((sq.value() - truth.square().sum(0)) / truth.square().sum(0)).abs().max() < 2e-6
    # reading flushes; adding after a read goes on from the total
    before = acc.value().clone()
    acc.add_(addends[0])
    assert torch.allclose(acc.value(), before + addends[0].double(), rtol=1e-7, atol=0)


def test_float64_addends_go_straight_into_the_total():
    acc = Float64Sum((3,), block=16)
    acc.add_(torch.tensor([1.0, 1e-17, 2.0], dtype=torch.float64))
    acc.add_(torch.tensor([1e-17, 1.0, 0.0], dtype=torch.float64))
    assert acc.value().tolist() == [1.0 + 1e-17, 1e-17 + 1.0, 2.0]


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1_000_003])
def test_sum_of_squares_is_float64_accurate(n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.rand(n) ** 4
    truth = float(t.double().square().sum())
    got = sum_of_squares(t)
    assert got == pytest.approx(truth, rel=1e-6, abs=0)
    assert sum_of_squares(t.half()) == pytest.approx(float(t.half().double().square().sum()), rel=1e-6, abs=0)
    assert sum_of_squares(t.double().reshape(-1, 1)) == pytest.approx(truth, rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float64_sum_sink_in_the_first_addends_layout(dtype):
    # a producer adding into sink() in place (counted by added_in_place_) sums like add_, across the
    # float32 blocks' folds, and the sum keeps the first addend's (permuted) layout
    g = torch.Generator().manual_seed(1)
    addends = [torch.rand(4, 3, 5, generator=g, dtype=dtype).permute(1, 2, 0) for _ in range(37)]
    acc = Float64Sum((3, 5, 4), block=16)
    assert acc.sink(dtype) is None           # no layout before a first addend
    acc.add_(addends[0])
    for t in addends[1:]:
        target = acc.sink(dtype)
        assert target.stride() == addends[0].stride()
        target.add_(t)
        acc.added_in_place_(target)
    truth = torch.stack([t.double() for t in addends]).sum(0)
    assert ((acc.value() - truth).abs() / truth).max() < 2e-6
    with pytest.raises(ValueError):
        acc.added_in_place_(torch.zeros(3, 5, 4, dtype=dtype))


def test_carried_norms_are_reused_until_the_tensor_changes():
    """A norm carried from an earlier block is reused while the tensor (one that requires no gradient) keeps
    its version counter and storage, formed again after an in-place change or a ``.data`` swap; a tensor
    that requires a gradient is never carried (a fused optimizer moves no counter); outside a block nothing
    is kept."""
    from unittest import mock

    from ftdoctor.engine import sums

    w = torch.randn(300, 20, dtype=torch.float64)
    trained = torch.nn.Parameter(torch.randn(300, 20, dtype=torch.float64))
    calls = []
    real = sums.sum_of_squares
    with mock.patch.object(sums, "sum_of_squares", side_effect=lambda t: calls.append(1) or real(t)):
        with sums.remembered_norms() as carry:
            first = sums.weight_sum_of_squares(w)
            assert sums.weight_sum_of_squares(w) == first
            sums.weight_sum_of_squares(trained)
        assert len(calls) == 2
        with sums.remembered_norms(carry) as carry:
            assert sums.weight_sum_of_squares(w) == first
            sums.weight_sum_of_squares(trained)
        assert len(calls) == 3
        w.mul_(2.0)
        with sums.remembered_norms(carry) as carry:
            assert sums.weight_sum_of_squares(w) == pytest.approx(4 * first, rel=1e-12)
        w.data = torch.ones(300, 20, dtype=torch.float64)
        with sums.remembered_norms(carry) as carry:
            assert sums.weight_sum_of_squares(w) == 6000.0
        assert len(calls) == 5
        sums.weight_sum_of_squares(w)
        assert len(calls) == 6


def test_distance_in_chunks_equals_the_float64_sum():
    a, b = torch.randn(3_000_001), torch.randn(3_000_001)
    truth = float(((a.double() - b.double()) ** 2).sum())
    assert distance_sum_of_squares(a, b) == pytest.approx(truth, rel=1e-7)
    assert distance_sum_of_squares(a, b, chunk=1 << 16) == pytest.approx(truth, rel=1e-7)
