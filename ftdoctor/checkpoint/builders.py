"""Architectures as builders: a callable plus keyword arguments, and the state-dict signature it makes.

Signatures (key -> shape, and the head) are built on the ``meta`` device
(:class:`_MetaParameters`), so comparing a checkpoint with many candidate
architectures costs no memory; torchvision's are cached per process.
"""
from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ftdoctor.checkpoint.common import _cwd_on_sys_path, _key, _quiet, _short, affine_modules
from ftdoctor.errors import FtdoctorError


@dataclass(frozen=True)
class Builder:
    """A way to build a model: a callable, fixed keyword arguments, and whether it takes num_classes."""

    name: str
    fn: Callable[..., nn.Module]
    kwargs: tuple[tuple[str, Any], ...] = ()
    takes_num_classes: bool = True
    torchvision: bool = True

    def label(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.name}({extra})" if extra else self.name


@dataclass(frozen=True)
class Signature:
    """What a builder's state dict looks like: key -> shape, and the head (last affine layer)."""

    shapes: dict[str, tuple[int, ...]]
    head: str | None

    def comparable(self) -> frozenset[str]:
        return comparable(self.shapes)

    def head_outputs(self) -> int | None:
        shape = self.shapes.get(_key(self.head, "weight")) if self.head is not None else None
        return shape[0] if shape else None


def comparable(keys: Any) -> frozenset[str]:
    # Old checkpoints lack BatchNorm's num_batches_tracked, which load_state_dict tolerates; the buffers of
    # an ENTAME feature norm (ftdoctor fix --feature-norm) are not part of any architecture's own keys.
    from ftdoctor.featurenorm import is_feature_norm_key

    return frozenset(k for k in keys if not k.endswith("num_batches_tracked") and not is_feature_norm_key(k))

_META_FACTORIES = frozenset(
    {torch.empty, torch.empty_strided, torch.empty_permuted, torch.zeros, torch.ones, torch.full,
     torch.rand, torch.randn, torch.randint, torch.eye}
)  # fmt: skip


class _MetaParameters(TorchFunctionMode):
    """Create parameters and buffers on the ``meta`` device and skip their initialisation.

    Unlike ``with torch.device("meta")``, value-carrying factories (``arange``,
    ``tensor``, ``linspace``) stay on the CPU, so builders that compute their
    widths with tensors (RegNet) still work; in-place initialisers on meta
    tensors (``normal_``, ``kaiming_uniform_``'s ``uniform_``) return at once,
    which halves the time of a build.
    """

    def __init__(self, bound: "Bound | None" = None) -> None:
        super().__init__()
        self.bound = bound

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _META_FACTORIES:
            if kwargs.get("device") is None:
                kwargs["device"] = "meta"
            if self.bound is not None:
                self.bound.count(func, args, kwargs)
        elif args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.startswith("__"):
                return args[0]
        return func(*args, **kwargs)


class TooLarge(FtdoctorError):
    """A model's description asks for far more tensors or elements than its checkpoint holds."""


@dataclass
class Bound:
    """How many tensors and elements building a model may create (on meta, before anything is allocated):
    a config that describes a model far larger than its weights is refused before it is built for real."""

    tensors: int
    elements: int
    what: str = "the model"
    made: int = 0
    size: int = 0

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], what: str) -> "Bound":
        """Four times what ``state`` holds, plus room for buffers a checkpoint need not store."""
        return cls(4 * len(state) + 64, 4 * sum(t.numel() for t in state.values()) + 2**20, what)

    def count(self, func: Any, args: tuple, kwargs: dict) -> None:
        shape = kwargs.get("size", args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args)
        if func in (torch.full, torch.randint):       # (size, fill) and (low, high, size): count only
            shape = ()
        try:
            numel = math.prod(int(d) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else 0
        except (TypeError, ValueError):
            numel = 0
        self.made += 1
        self.size += numel
        if self.made > self.tensors or self.size > self.elements:
            raise TooLarge(f"{self.what} describes a model far larger than its weights (building it asks for "
                           f"more than {self.tensors:,} tensors or {self.elements:,} elements)",
                           "check the config against the weights; nothing was allocated")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Building thousands of modules triggers many pointless cyclic collections.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

_SIGNATURES: dict[tuple[str, tuple], Signature | None] = {}


def signature_for(builder: Builder, bound: Bound | None = None, **extra: Any) -> Signature | None:
    """The builder's state-dict signature, built on ``meta`` once per process (None if it cannot be);
    ``bound`` refuses (:class:`TooLarge`) a model far larger than the checkpoint it is for."""
    kwargs = dict(builder.kwargs, **extra)
    cache_key = (builder.name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if builder.torchvision and cache_key in _SIGNATURES:
        return _SIGNATURES[cache_key]
    try:
        with _quiet(), _gc_paused(), _MetaParameters(None if bound is None else Bound(bound.tensors,
                                                                                      bound.elements, bound.what)):
            model = builder.fn(**kwargs)
        if not isinstance(model, nn.Module):
            return None
        signature = signature_of(model)
    except TooLarge:
        raise
    except Exception:
        signature = None
    if builder.torchvision:
        _SIGNATURES[cache_key] = signature
    return signature


def signature_of(model: nn.Module) -> Signature:
    layers = affine_modules(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return Signature(shapes, layers[-1][0] if layers else None)


def image_size_kwargs(builder: Builder, signature: Signature, state: Mapping[str, torch.Tensor]) -> dict:
    """torchvision ViTs: the image size implied by the checkpoint's position embedding, if it differs."""
    key = "encoder.pos_embedding"
    if not builder.torchvision or key not in signature.shapes or key not in state or "conv_proj.weight" not in state:
        return {}
    tokens = state[key].shape
    if len(tokens) != 3 or tuple(tokens) == signature.shapes[key]:
        return {}
    patch = state["conv_proj.weight"].shape[-1]
    side = math.isqrt(tokens[1] - 1)
    return {"image_size": side * patch} if side * side == tokens[1] - 1 else {}


def build_kwargs(
    builder: Builder, signature: Signature | None, state: Mapping[str, torch.Tensor], num_classes: int | None
) -> dict[str, Any]:
    kwargs = dict(builder.kwargs)
    if num_classes is not None and builder.takes_num_classes:
        kwargs["num_classes"] = num_classes
    if signature is not None:
        kwargs.update(image_size_kwargs(builder, signature, state))
    return kwargs


def head_classes(signature: Signature | None, state: Mapping[str, torch.Tensor]) -> int | None:
    if signature is None or signature.head is None:
        return None
    weight = state.get(_key(signature.head, "weight"))
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def build(builder: Builder, kwargs: dict[str, Any]) -> nn.Module:
    try:
        with _quiet(), (_cwd_on_sys_path() if not builder.torchvision else contextlib.nullcontext()):
            model = builder.fn(**kwargs)
    except Exception as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise FtdoctorError(
            f"building {builder.name}({shown}) failed: {_short(exc)}",
            "check --arch (and --num-classes); an import-path callable must build the model from keyword defaults",
        ) from None
    if not isinstance(model, nn.Module):
        raise FtdoctorError(
            f"--arch {builder.name} returned a {type(model).__name__}, not an nn.Module",
            "point --arch at a model class or a function returning one",
        )
    return model


def check_size(build: Callable[[], Any], bound: Bound) -> None:
    """Run ``build`` on meta under ``bound``: :class:`TooLarge` when it asks for far more than the checkpoint
    holds; any other failure is left for the real build to report."""
    try:
        with _quiet(), _gc_paused(), _MetaParameters(bound):
            build()
    except TooLarge:
        raise
    except Exception:  # noqa: BLE001
        pass
