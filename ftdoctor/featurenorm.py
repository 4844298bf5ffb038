"""ENTAME's parameter-free feature normalisation (Varno et al. 2019, §5, eq. 20) as modules.

:class:`FeatureNorm` z-normalises the features ``xᴸ`` that enter the head, per
feature (the last dimension), across the batch:

* training: ``x̄ = (x − μ_N) / sqrt(σ²_N + ε)`` with the batch's mean and
  (population) variance; gradients flow through them, as in batch norm. Their
  detached values are stored in the buffers ``mean`` and ``var`` (eq. 20's
  ``μ̂_N = detach(μ_N)``, ``σ̂_N = detach(σ_N)``);
* eval: ``x̄ = (x − mean) / sqrt(var + ε)`` with the buffers — the statistics of
  the last training batch, not a running average (that is what eq. 20 says).

Unlike batch norm it has no learnable parameters. :meth:`FeatureNorm.set_statistics`
/ :func:`feature_statistics` initialise the buffers from data, so a freshly
fixed checkpoint works in eval mode at once.

:class:`FeatureNormLinear` is an ``nn.Linear`` that applies a ``FeatureNorm``
to its input first. It keeps the Linear's parameter names (``weight``,
``bias``) and adds only two buffers, ``feature_norm.mean`` and
``feature_norm.var``, so a head can be swapped for one in place: the model's
other keys do not move. The normalisation runs as a forward *pre*-hook, so
forward hooks on the head (ftdoctor's probes) see the normalised features the
Linear actually multiplies.

A state dict written by ``ftdoctor fix --method entame --feature-norm`` holds
those two extra buffer keys under the head's name. Your architecture does not
have them; :func:`attach_feature_norms` puts the ``FeatureNormLinear`` heads
back before loading::

    state = torch.load("fixed.pt", weights_only=True)
    model = MyNet(num_classes=5)
    attach_feature_norms(model, state)   # fc: Linear -> FeatureNormLinear
    model.load_state_dict(state)

ftdoctor's own loader does this by itself.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["FeatureNorm", "FeatureNormLinear", "attach_feature_norms", "feature_norm_keys",
           "feature_statistics", "insert_feature_norm", "is_feature_norm_key"]

_SUFFIXES = (".feature_norm.mean", ".feature_norm.var")


class FeatureNorm(nn.Module):
    """Parameter-free z-normalisation of the last dimension (ENTAME eq. 20)."""

    mean: Tensor
    var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("var", torch.ones(num_features, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            flat = x.reshape(-1, self.num_features)
            mu = flat.mean(dim=0)
            var = flat.var(dim=0, unbiased=False)
            with torch.no_grad():
                self.mean.copy_(mu.detach())
                self.var.copy_(var.detach())
            return (x - mu) / torch.sqrt(var + self.eps)
        return (x - self.mean) / torch.sqrt(self.var + self.eps)

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, var: Tensor) -> "FeatureNorm":
        """Set the eval-mode statistics (e.g. from :func:`feature_statistics` over a dataset)."""
        self.mean.copy_(mean.to(self.mean))
        self.var.copy_(var.to(self.var))
        return self

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def feature_statistics(batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population variance (float64) of features streamed in batches.

    Each batch is ``(B, ..., K)``; every position but the last dimension is a sample.
    """
    count = 0
    total: Tensor | None = None
    total_sq: Tensor | None = None
    for x in batches:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        s, s2 = flat.sum(dim=0), (flat * flat).sum(dim=0)
        total = s if total is None else total + s
        total_sq = s2 if total_sq is None else total_sq + s2
        count += flat.shape[0]
    if total is None or total_sq is None or count == 0:
        raise ValueError("no features to take statistics of")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean, var


def _normalize_input(module: "FeatureNormLinear", args: tuple) -> tuple:
    # A module-level function (not a lambda) so a pickled model carries the hook by reference.
    return (module.feature_norm(args[0]),) + tuple(args[1:])


class FeatureNormLinear(nn.Linear):
    """``Linear(FeatureNorm(x))``: the ENTAME head (eq. 20 then eq. 21's linear layer).

    Same ``weight``/``bias`` names as ``nn.Linear``; the feature statistics are
    the buffers ``feature_norm.mean`` / ``feature_norm.var``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.feature_norm = FeatureNorm(in_features, eps, device=device, dtype=dtype)
        self.register_forward_pre_hook(_normalize_input)

    @classmethod
    def from_linear(cls, linear: nn.Linear, eps: float = 1e-5) -> "FeatureNormLinear":
        """A FeatureNormLinear holding (copies of) ``linear``'s weight and bias."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, eps=eps,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def insert_feature_norm(model: nn.Module, head: str, eps: float = 1e-5) -> FeatureNormLinear:
    """Replace the Linear ``head`` of ``model`` by a :class:`FeatureNormLinear` with the same weights."""
    module = model.get_submodule(head)
    if isinstance(module, FeatureNormLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{head} is a {type(module).__name__}; the feature norm needs a Linear head")
    new = FeatureNormLinear.from_linear(module, eps)
    _set_module(model, head, new)
    return new


def is_feature_norm_key(key: str) -> bool:
    """True for the buffer keys a :class:`FeatureNormLinear` adds to a state dict."""
    return key.endswith(_SUFFIXES)


def feature_norm_keys(state: Mapping[str, object]) -> list[str]:
    """Names of the modules that carry feature-norm buffers in ``state`` (in key order)."""
    names: list[str] = []
    for key in state:
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                if name not in names:
                    names.append(name)
    return names


def attach_feature_norms(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Turn every Linear that ``state`` gives feature-norm buffers into a :class:`FeatureNormLinear`.

    Call it on a freshly built model before ``load_state_dict(state)``; returns
    notes naming what was re-inserted (empty when ``state`` has no such keys).
    Names that are not a Linear of ``model`` are left alone (``load_state_dict``
    then reports them as unexpected keys).
    """
    notes = []
    for name in feature_norm_keys(state):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, FeatureNormLinear) or not isinstance(module, nn.Linear):
            continue
        eps_key = f"{name}.feature_norm.var"
        insert_feature_norm(model, name)
        if eps_key in state:
            notes.append(f"{name}: feature norm (ENTAME eq. 20) re-inserted before the head from the "
                         f"checkpoint's {name}.feature_norm.* buffers")
    return notes

