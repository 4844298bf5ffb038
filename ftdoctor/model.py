"""Model introspection: affine layers in forward-execution order, the head, new heads.

SPEC §1: an *affine layer* is an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (including
subclasses); the *head* is the last affine layer in forward-execution order
(``--head NAME`` overrides). Registration order is not execution order (a model
may register its classifier first), so the order is found with forward hooks
on one real batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor.errors import FtdoctorError

AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SCRIPTED_AFFINE = {"Linear", "Conv1d", "Conv2d", "Conv3d"}

# Input sizes tried, in order, when a layer order is needed without data (inspect).
_PROBE_SIZES = (32, 64, 224, 28, 96, 8)


@dataclass(frozen=True)
class AffineLayer:
    """One affine layer: its qualified name, the module, and its kind (class name)."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return getattr(self.module, "original_name", None) or type(self.module).__name__

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)


def is_scripted(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def is_affine(module: nn.Module) -> bool:
    if isinstance(module, AFFINE_TYPES):
        return True
    # TorchScript submodules keep their eager class name in `original_name`.
    return (isinstance(module, torch.jit.ScriptModule)
            and getattr(module, "original_name", "") in _SCRIPTED_AFFINE
            and isinstance(getattr(module, "weight", None), Tensor))


def registered_affine_layers(model: nn.Module) -> list[AffineLayer]:
    """Affine layers in registration order (the fallback when no forward can run)."""
    return [AffineLayer(n, m) for n, m in model.named_modules() if n and is_affine(m)]


def training_modes(*models: nn.Module) -> dict[nn.Module, bool]:
    """Every module's ``training`` flag, parents before children (:func:`restore_modes` sets them back)."""
    return {m: m.training for model in models for m in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Set back the flags :func:`training_modes` kept: parents first, ``train(flag)`` only on a module
    whose flag differs (it sets its whole subtree, honouring a model's own ``train`` override), so a
    model that was in one mode throughout costs one recursive call, not one per module (a BERT's
    per-module calls cost about 2 ms)."""
    for m, training in modes.items():
        if m.training != training:
            m.train(training)


@contextlib.contextmanager
def _preserved_mode(model: nn.Module) -> Iterator[None]:
    modes = training_modes(model)
    try:
        yield
    finally:
        restore_modes(modes)


def forward_order(model: nn.Module, example: Tensor) -> list[AffineLayer]:
    """Affine layers in the order their forward first runs on ``example``.

    Layers that never run on the example are left out (the caller reports them
    as skipped). TorchScript modules cannot take Python hooks after scripting,
    so for them the registration order is returned.
    """
    if is_scripted(model):
        return registered_affine_layers(model)
    order: list[str] = []

    def seen(name: str, mod: nn.Module, args: tuple, out: object) -> None:
        if name not in order:
            order.append(name)

    _hooked_forward(model, example, [n for n, m in model.named_modules() if n and is_affine(m)], seen)
    modules = dict(model.named_modules())
    return [AffineLayer(n, modules[n]) for n in order]


def measured_layers(model: nn.Module, layers: Sequence[AffineLayer], example: Tensor | None) -> list[AffineLayer]:
    """``layers`` (the affine ones) with the embedding and normalisation layers whose per-example squares the
    engine forms (:mod:`ftdoctor.engine.norm_squares`), in forward order on ``example``: what the change-rate
    and gradient-norm probes measure. A subclass with its own forward (timm's ``LayerNorm``) is measured
    when, on the example, it computes its base class's function. Without an example, or for TorchScript,
    ``layers`` alone."""
    from ftdoctor.engine.norm_squares import NORM_TYPES, supports_norm, verify_forward

    if example is None or is_scripted(model) or not any(isinstance(m, NORM_TYPES) for m in model.modules()):
        return list(layers)
    affine = {l.name for l in layers}
    order: list[str] = []

    def seen(name: str, mod: nn.Module, args: tuple, out: object) -> None:
        if name in order:
            return
        if isinstance(mod, NORM_TYPES) and supports_norm(mod) is not None:
            if not (args and isinstance(args[0], Tensor) and isinstance(out, Tensor)
                    and verify_forward(mod, args[0], out) and supports_norm(mod) is None):
                return
        order.append(name)

    names = [n for n, m in model.named_modules() if n and (n in affine or isinstance(m, NORM_TYPES))]
    try:
        _hooked_forward(model, example, names, seen)
    except Exception:  # noqa: BLE001 - the affine order stands; embeddings and norms are then not measured
        return list(layers)
    modules = dict(model.named_modules())
    found = [AffineLayer(n, modules[n]) for n in order]
    missing = [l for l in layers if l.name not in order]       # an affine layer this pass did not see
    return found + missing if missing else found


def _hooked_forward(model: nn.Module, example: Tensor, names: list[str],
                    seen: Callable[[str, nn.Module, tuple, object], None]) -> None:
    """One eval-mode forward of ``example`` without gradients, ``seen(name, module, args, out)`` called
    as each named module runs; the model's modes and hooks are left as they were."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda mod, args, out, _n=n: seen(_n, mod, args, out)) for n in names]
    try:
        with torch.no_grad(), _preserved_mode(model):
            model.eval()
            forward.logits(model, example)
    finally:
        for h in handles:
            h.remove()


def dummy_inputs(model: nn.Module, image_size: int | None = None) -> Iterator[Tensor]:
    """Plausible single-example inputs for a model, for finding the layer order without data."""
    layers = registered_affine_layers(model)
    if not layers:
        return
    first = layers[0].module
    param = first.weight
    kind = layers[0].kind
    sizes = (image_size,) if image_size else _PROBE_SIZES
    if kind == "Linear":
        yield torch.zeros(1, first.weight.shape[1], dtype=param.dtype, device=param.device)
        return
    cin = first.weight.shape[1] * getattr(first, "groups", 1)
    dims = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}.get(kind, 2)
    for s in sizes:
        if dims == 3 and s > 64:
            continue
        yield torch.zeros(1, cin, *([s] * dims), dtype=param.dtype, device=param.device)


def layer_order(model: nn.Module, example: Tensor | None = None,
                image_size: int | None = None) -> tuple[list[AffineLayer], str]:
    """Affine layers in forward order, and how the order was found.

    With ``example`` the order comes from that batch; otherwise a few dummy
    inputs are tried; if none runs, registration order is used (and said so).
    """
    if example is not None:
        return forward_order(model, example), "registration" if is_scripted(model) else "forward"
    if is_scripted(model):
        return registered_affine_layers(model), "registration"
    for x in dummy_inputs(model, image_size):
        try:
            return forward_order(model, x), "forward"
        except Exception:  # noqa: BLE001 - a wrong guess of the input shape; try the next
            continue
    return registered_affine_layers(model), "registration"


def find_head(layers: Sequence[AffineLayer], head: str | None = None) -> AffineLayer:
    """The head: the last affine layer in forward order, or the one named ``head``."""
    if not layers:
        raise FtdoctorError(
            "the model has no affine layer (Linear or Conv1d/2d/3d), so it has no head to diagnose",
            "ftdoctor works on classifiers whose output comes from a Linear or convolution layer")
    if head is None:
        return layers[-1]
    for layer in layers:
        if layer.name == head:
            return layer
    names = ", ".join(layer.name for layer in layers[-5:])
    raise FtdoctorError(f"--head {head!r} is not an affine layer of this model",
                        f"pass one of the affine layers' names, e.g. {names}")


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def num_outputs(layer: AffineLayer) -> int:
    return int(layer.weight.shape[0])


def new_head_like(old: nn.Module, num_classes: int) -> nn.Module:
    """A fresh ``Linear(in_features, C)`` for a Linear head (a conv head keeps its geometry)."""
    w = old.weight
    if isinstance(old, nn.Linear) or getattr(old, "original_name", "") == "Linear":
        new: nn.Module = nn.Linear(w.shape[1], num_classes, bias=True)
    elif isinstance(old, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        new = type(old)(old.in_channels, num_classes, old.kernel_size, stride=old.stride,
                        padding=old.padding, dilation=old.dilation, groups=1, bias=True)
    else:
        raise FtdoctorError(f"cannot replace a head of kind {type(old).__name__}",
                            "use an eager checkpoint (not TorchScript) to attach a new head")
    return new.to(device=w.device, dtype=w.dtype)


def replace_head(model: nn.Module, head_name: str, num_classes: int,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Replace the head by a fresh layer with ``num_classes`` outputs (PyTorch default init).

    With ``generator`` the initialisation is drawn from it, so it is reproducible.
    """
    old = get_module(model, head_name)
    if is_scripted(model):
        raise FtdoctorError("a TorchScript model's head cannot be replaced",
                            "pass the eager checkpoint (state dict) with --arch instead")
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        new = new_head_like(old, num_classes)
    set_module(model, head_name, new)
    return new
