"""Head initialisers shared by the probes, the fixes and the training runs.

Every initialiser draws from an explicit ``torch.Generator`` so a seed fixes it
without touching the global RNG.

* ``kaiming`` — He-normal weights (``N(0, 2/fan_in)``), zero bias: ENTAME's
  baseline ("initialized based on preserving the variance of gradient [8]").
* ``torch-default`` — what ``reset_parameters()`` draws for ``nn.Linear`` /
  ``nn.ConvNd``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weight and bias
  (RIFLE's authors re-initialise this way).
* ``entame`` — the maximum-entropy initialisation, ENTAME §5 eq. 21:
  ``W ~ N(0, φ_w)``, ``b = 0`` (φ_w = 1e-12 by default, the paper's setting).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

HEAD_INITS = ("kaiming", "torch-default", "entame")
ENTAME_PHI_W = 1e-12


def entame_phi_w(lr: float, lam: float, num_classes: int) -> float:
    """φ_w = γ²λ²/C² (ENTAME §5, below eq. 21), from the learning rate γ and λ."""
    return (lr * lam / num_classes) ** 2


def _fan_in(weight: Tensor) -> int:
    return int(weight[0].numel())


def init_head_tensors(weight_shape: torch.Size | tuple[int, ...], has_bias: bool, method: str,
                      generator: torch.Generator, phi_w: float = ENTAME_PHI_W,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """Fresh (weight, bias) for a head of ``weight_shape`` drawn the ``method`` way."""
    shape = tuple(weight_shape)
    fan_in = int(math.prod(shape[1:]))
    out = shape[0]
    if method == "kaiming":
        w = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
        b = torch.zeros(out, dtype=torch.float64) if has_bias else None
    elif method in ("torch-default", "kaiming-uniform"):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        b = ((torch.rand(out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
             if has_bias else None)
    elif method == "kaiming-normal":
        w = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
        b = torch.zeros(out, dtype=torch.float64) if has_bias else None
    elif method == "entame":
        w = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(phi_w)
        b = torch.zeros(out, dtype=torch.float64) if has_bias else None
    elif method == "zeros":
        w = torch.zeros(shape, dtype=torch.float64)
        b = torch.zeros(out, dtype=torch.float64) if has_bias else None
    else:
        raise ValueError(f"unknown head initialisation {method!r}")
    return w.to(dtype), (None if b is None else b.to(dtype))


@torch.no_grad()
def init_head_(head: nn.Module, method: str, generator: torch.Generator,
               phi_w: float = ENTAME_PHI_W) -> nn.Module:
    """Re-initialise ``head`` in place (weight and bias) and return it."""
    bias = getattr(head, "bias", None)
    w, b = init_head_tensors(head.weight.shape, bias is not None, method, generator, phi_w,
                             dtype=head.weight.dtype)
    head.weight.copy_(w.to(head.weight.device))
    if bias is not None and b is not None:
        bias.copy_(b.to(bias.device))
    return head


def generator_for(seed: int, stream: str = "") -> torch.Generator:
    """A generator seeded by ``seed``; a named ``stream`` gets draws of its own for the same seed (so a
    re-drawn head never repeats the fresh head ``--new-head`` installed with that seed)."""
    if stream:
        import zlib
        seed = (int(seed) * 0x9E3779B1 + zlib.crc32(stream.encode())) % (2**63)
    return torch.Generator().manual_seed(int(seed))


def seed_head_params(weight_shape: torch.Size, has_bias: bool, method: str, seed: int,
                     k: int) -> tuple[Tensor, Tensor | None]:
    """The k-th fresh head of a ``--new-head --seeds K`` run (k = 0 is the one installed in the model)."""
    return init_head_tensors(weight_shape, has_bias, method, generator_for(1000 * seed + k))
