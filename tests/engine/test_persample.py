"""grad_sq_sum against a brute-force loop over single examples with autograd.

With the loss ℓ_n = η_n · layer(x_n), the gradient w.r.t. the layer output is
η itself, so ``grad_sq_sum(layer, x, η)`` must equal Σ_n (∂ℓ_n/∂θ)² computed
one example at a time.  Every kernel (``pairs``, ``bmm``, ``conv``) is checked,
not only the one ``auto`` picks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ftdoctor.engine.persample import grad_sq_sum, supports
from helpers import layer_squares_vs_loop

F64 = torch.float64
ALL = ("auto", "pairs", "bmm")
ALL_CONV = ("auto", "pairs", "bmm", "conv")


def brute_force(layer: nn.Module, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_n (∂ℓ_n/∂θ)² with ℓ_n = η_n · layer(x_n), one example at a time."""
    w2 = torch.zeros_like(layer.weight)
    b2 = torch.zeros_like(layer.bias) if layer.bias is not None else None
    for n in range(x.shape[0]):
        layer.zero_grad()
        out = layer(x[n : n + 1])
        (eta[n : n + 1] * out).sum().backward()
        w2 += layer.weight.grad ** 2
        if b2 is not None:
            b2 += layer.bias.grad ** 2
    return w2, b2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def check(layer: nn.Module, x: torch.Tensor, *, tol: float = 1e-5, methods=("auto",), **kw) -> None:
    """Every method in ``methods`` matches the brute force within ``tol`` (max-relative)."""
    torch.manual_seed(1)
    with torch.no_grad():
        eta = torch.randn_like(layer(x))
    want_w, want_b = brute_force(layer, x, eta)
    for method in methods:
        got_w, got_b = grad_sq_sum(layer, x, eta, method=method, **kw)
        assert got_w.shape == layer.weight.shape and got_w.dtype == x.dtype
        assert rel_err(got_w, want_w) < tol, method
        if layer.bias is None:
            assert got_b is None
        else:
            assert got_b.shape == layer.bias.shape
            assert rel_err(got_b, want_b) < tol, method


def linear(*args, **kw) -> nn.Linear:
    return nn.Linear(*args, **kw).to(F64)


def conv(cls, *args, **kw) -> nn.Module:
    return cls(*args, **kw).to(F64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_linear_2d_closed_form() -> None:
    check(linear(7, 5), torch.randn(12, 7, dtype=F64), methods=ALL)


def test_linear_3d_tokens() -> None:
    check(linear(7, 5), torch.randn(12, 6, 7, dtype=F64), methods=ALL)


def test_linear_4d_channels_last() -> None:
    check(linear(8, 6), torch.randn(5, 3, 4, 8, dtype=F64), methods=ALL)


def test_linear_without_bias() -> None:
    check(linear(7, 5, bias=False), torch.randn(9, 3, 7, dtype=F64), methods=ALL)


def test_conv1d_stride_padding_dilation() -> None:
    layer = conv(nn.Conv1d, 3, 4, 3, stride=2, padding=2, dilation=2)
    check(layer, torch.randn(6, 3, 17, dtype=F64), methods=ALL_CONV)


def test_conv2d_plain() -> None:
    check(conv(nn.Conv2d, 3, 5, 3), torch.randn(6, 3, 8, 7, dtype=F64), methods=ALL_CONV)


def test_conv2d_stride_padding_dilation_groups() -> None:
    layer = conv(nn.Conv2d, 4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    check(layer, torch.randn(6, 4, 9, 10, dtype=F64), methods=ALL_CONV)


def test_conv2d_depthwise() -> None:
    layer = conv(nn.Conv2d, 5, 5, 3, padding=1, groups=5)
    check(layer, torch.randn(6, 5, 7, 7, dtype=F64), methods=ALL_CONV)


def test_conv2d_depthwise_multiplier() -> None:
    layer = conv(nn.Conv2d, 3, 6, (3, 2), stride=(1, 2), groups=3)
    check(layer, torch.randn(6, 3, 7, 8, dtype=F64), methods=ALL_CONV)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv2d_padding_same_even_kernel() -> None:
    # an even kernel pads asymmetrically: one more at the end
    check(conv(nn.Conv2d, 3, 4, 4, padding="same"), torch.randn(6, 3, 7, 6, dtype=F64), methods=ALL_CONV)
    check(conv(nn.Conv2d, 3, 4, 3, padding="same", dilation=2), torch.randn(6, 3, 7, 6, dtype=F64), methods=ALL_CONV)


def test_conv2d_padding_valid() -> None:
    check(conv(nn.Conv2d, 3, 4, 3, padding="valid"), torch.randn(6, 3, 7, 6, dtype=F64))


def test_conv2d_without_bias() -> None:
    check(conv(nn.Conv2d, 3, 4, 3, padding=1, bias=False), torch.randn(6, 3, 6, 6, dtype=F64), methods=ALL_CONV)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv2d_padding_modes(mode: str) -> None:
    layer = conv(nn.Conv2d, 3, 4, 3, padding=(1, 2), padding_mode=mode)
    check(layer, torch.randn(5, 3, 6, 7, dtype=F64), methods=ALL_CONV)


def test_conv3d_small() -> None:
    layer = conv(nn.Conv3d, 2, 4, (2, 3, 3), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2))
    check(layer, torch.randn(5, 2, 5, 6, 7, dtype=F64), methods=ALL_CONV)


def test_conv_one_by_one_output_uses_closed_form() -> None:
    # a 1×1 output map (resnet's layer4 at 32×32 input): L = 1
    check(conv(nn.Conv2d, 4, 6, 3, padding=1), torch.randn(7, 4, 1, 1, dtype=F64), methods=ALL_CONV)


def test_float32() -> None:
    layer = nn.Conv2d(8, 16, 3, padding=1)
    check(layer, torch.randn(16, 8, 6, 6), tol=1e-4, methods=ALL_CONV)
    check(nn.Linear(8, 16), torch.randn(16, 5, 8), tol=1e-4, methods=ALL)


def test_chunked_equals_unchunked() -> None:
    layer = conv(nn.Conv2d, 4, 6, 3, padding=1, groups=2)
    x = torch.randn(11, 4, 3, 4, dtype=F64)
    g = torch.randn(11, 6, 3, 4, dtype=F64)
    for method in ALL_CONV:
        whole_w, whole_b = grad_sq_sum(layer, x, g, method=method)
        for max_bytes in (1, 3000):  # one example per chunk; a few, with a ragged last chunk
            w, b = grad_sq_sum(layer, x, g, method=method, max_chunk_bytes=max_bytes)
            assert rel_err(w, whole_w) < 1e-12 and rel_err(b, whole_b) < 1e-12
    check(layer, x, methods=ALL_CONV, max_chunk_bytes=1)
    check(linear(7, 5), torch.randn(9, 3, 7, dtype=F64), methods=ALL, max_chunk_bytes=1)


def test_inputs_with_grad_history_and_half_precision() -> None:
    layer = nn.Linear(6, 4)
    x = torch.randn(8, 3, 6, requires_grad=True)
    g = torch.randn(8, 3, 4)
    w, _ = grad_sq_sum(layer, x * 2, g)
    assert not w.requires_grad
    w16, _ = grad_sq_sum(layer, (x * 2).detach().bfloat16(), g.bfloat16())
    assert w16.dtype == torch.float32 and rel_err(w16, w) < 3e-2


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="output gradient"):
        grad_sq_sum(nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError):
        grad_sq_sum(nn.Linear(3, 4), torch.randn(2, 3), torch.randn(2, 5))


def test_supports() -> None:
    assert supports(nn.Linear(3, 4)) is None
    assert supports(nn.Conv1d(3, 4, 3)) is None
    assert supports(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")) is None
    assert supports(nn.Conv3d(3, 4, 3)) is None

    class MyConv(nn.Conv2d):
        pass

    assert supports(MyConv(3, 4, 3)) is None
    assert "ConvTranspose not supported" in supports(nn.ConvTranspose2d(3, 4, 3))
    assert "not an affine layer" in supports(nn.BatchNorm2d(3))
    assert "not an affine layer" in supports(nn.MultiheadAttention(8, 2))
    assert "not initialised" in supports(nn.LazyLinear(4))
    with pytest.raises(TypeError, match="ConvTranspose"):
        grad_sq_sum(nn.ConvTranspose2d(3, 4, 3), torch.randn(2, 3, 5, 5), torch.randn(2, 4, 7, 7))
    with pytest.raises(ValueError, match="convolutions only"):
        grad_sq_sum(nn.Linear(3, 4), torch.randn(2, 3), torch.randn(2, 4), method="conv")


def test_torchvision_resnet18_all_layers() -> None:
    """Every affine layer of a real architecture, against per-example autograd."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5).eval()
    for name, (got, want) in layer_squares_vs_loop(model, torch.randn(3, 3, 32, 32)).items():
        assert rel_err(got, want) < 1e-4, name


@pytest.mark.parametrize(
    "kw, size",
    [
        (dict(kernel_size=3, padding=1), (1, 1)),  # only the centre tap sees the input
        (dict(kernel_size=3, padding=1, stride=2), (2, 2)),  # the first row/column only sees padding
        (dict(kernel_size=5, padding=4, dilation=2), (3, 2)),
        (dict(kernel_size=(3, 5), padding=(2, 3), stride=(3, 1)), (1, 4)),
    ],
)
def test_conv2d_taps_that_only_see_padding(kw: dict, size: tuple[int, int]) -> None:
    check(conv(nn.Conv2d, 3, 4, **kw), torch.randn(5, 3, *size, dtype=F64), methods=ALL_CONV)


def test_taps_that_never_see_the_input() -> None:
    # stride 3 over padding 5 never lands on the single input column: the gradient is 0
    layer = conv(nn.Conv1d, 2, 3, 1, stride=3, padding=5)
    x = torch.randn(4, 2, 1, dtype=F64)
    for method in ALL_CONV:
        w, b = grad_sq_sum(layer, x, torch.randn(4, 3, 4, dtype=F64), method=method)
        assert w.shape == layer.weight.shape and not w.any() and b.shape == (3,)
    check(layer, x, methods=ALL_CONV)


def test_channels_last_input() -> None:
    layer = conv(nn.Conv2d, 4, 6, 3, padding=1, stride=2)
    x = torch.randn(5, 4, 7, 6, dtype=F64).contiguous(memory_format=torch.channels_last)
    check(layer, x, methods=ALL_CONV)


def test_subclass_with_its_own_forward_is_refused() -> None:
    class StandardisedConv(nn.Conv2d):  # timm's StdConv2d: the weight's gradient is not g·xᵀ
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    assert "overrides forward()" in supports(StandardisedConv(3, 4, 3))
    assert supports(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 4)) is None


def test_empty_batch_and_unbatched_input() -> None:
    w, b = grad_sq_sum(nn.Conv2d(3, 4, 3), torch.randn(0, 3, 5, 5), torch.randn(0, 4, 3, 3))
    assert w.shape == (4, 3, 3, 3) and not w.any() and b.shape == (4,)
    layer = conv(nn.Conv2d, 3, 4, 3)
    x, g = torch.randn(3, 5, 5, dtype=F64), torch.randn(4, 3, 3, dtype=F64)
    want_w, want_b = brute_force(layer, x.unsqueeze(0), g.unsqueeze(0))
    got_w, got_b = grad_sq_sum(layer, x, g)
    assert rel_err(got_w, want_w) < 1e-10 and rel_err(got_b, want_b) < 1e-10


@pytest.mark.parametrize("layout", ["returned", "standard"])
def test_running_sum_in_out(layout) -> None:
    # out=: two batches added into one running sum equal the two results added, for every kernel, with
    # the running sum laid out like a first result (the pairs kernel's tap-major layout) or plainly
    cases = [
        (conv(nn.Conv2d, 4, 6, 3, padding=1, groups=2), (9, 4, 3, 4)),
        (conv(nn.Conv2d, 4, 6, 3, padding=1), (7, 4, 1, 1)),                 # dead taps, L = 1
        (conv(nn.Conv2d, 3, 5, 1), (6, 3, 4, 4)),                            # 1×1 kernel
        (linear(7, 5), (9, 3, 7)),
    ]
    for layer, shape in cases:
        methods = ALL if isinstance(layer, nn.Linear) else ALL_CONV
        x1, x2 = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
        g1, g2 = (torch.randn(layer(x).shape, dtype=F64) for x in (x1, x2))
        for method in methods:
            for max_bytes in (1, 256 * 2**20):
                w1, _ = grad_sq_sum(layer, x1, g1, method=method, max_chunk_bytes=max_bytes)
                w2, _ = grad_sq_sum(layer, x2, g2, method=method, max_chunk_bytes=max_bytes)
                acc = torch.zeros_like(w1) if layout == "returned" else torch.zeros(w1.shape, dtype=F64)
                for x, g in ((x1, g1), (x2, g2)):
                    got, _ = grad_sq_sum(layer, x, g, method=method, max_chunk_bytes=max_bytes, out=acc)
                    assert got is acc
                assert rel_err(acc, w1 + w2) < 1e-12, (layer, method, max_bytes)
    with pytest.raises(ValueError, match="out must be"):
        grad_sq_sum(nn.Linear(3, 4), torch.randn(2, 3), torch.randn(2, 4), out=torch.zeros(3, 4))
