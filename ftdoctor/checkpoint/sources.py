"""Model sources: the registry of ways a checkpoint becomes a model (timm's ``register_model`` pattern).

A :class:`ModelSource` recognises a checkpoint it can build (from the file as
read, :class:`~.reading.CheckpointFile`, and the options), builds the model
with its weights, and writes a changed model back in the same format. The
sources are asked in priority order; the first that recognises the file builds
it. Adding a source is one module with a :class:`ModelSource` subclass
decorated with :func:`register_model_source`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ftdoctor.checkpoint.common import LoadedModel, ModelOptions, _short, affine_modules
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.errors import FtdoctorError
from ftdoctor.registry import Registry

MODEL_SOURCES = Registry("model source", instances=True)
#: class decorator: make a model source available to every command
register_model_source = MODEL_SOURCES.register


class ModelSource:
    """One way a checkpoint becomes a model; subclass and decorate with :func:`register_model_source`."""

    name: ClassVar[str] = ""
    #: lower is asked first (file layouts before state-dict architectures)
    priority: ClassVar[int] = 100

    def accepts_arch(self, arch: str) -> bool:
        """Whether ``--arch ARCH`` names an architecture of this source."""
        return False

    def check_arch(self, arch: str) -> None:
        """Raise FtdoctorError if ``arch`` (accepted) cannot be used, without reading any file."""

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        """A plan for building ``ckpt`` (anything but None), or None when this source cannot build it."""
        return None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        """The model with its weights (on the CPU; :func:`load_model` moves it and sets ``eval()``)."""
        raise NotImplementedError

    def input_size(self, arch: str | None, model: nn.Module) -> "InputSize | None":
        """The image size ``arch`` needs or was pretrained at, when the data's own size may not fit it."""
        return None

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        """Write ``model`` to ``out`` the way ``loaded`` was stored; return the file's sha256."""
        raise NotImplementedError


@dataclass(frozen=True)
class InputSize:
    """What image size a model takes: ``exact`` (it runs at no other, e.g. a ViT's position embeddings),
    or at least ``minimum``; ``pretrained`` is the size its weights were trained at (what ftdoctor resizes
    to when the data does not fit); ``why`` says so in words."""

    pretrained: int
    minimum: int = 1
    exact: int | None = None
    why: str = ""

    def fits(self, height: int, width: int) -> bool:
        if self.exact is not None:
            return height == width == self.exact
        return min(height, width) >= self.minimum


def input_size(loaded: LoadedModel) -> InputSize | None:
    """The :class:`InputSize` of a loaded model, from the source that built it (None: any size will do)."""
    for source in ordered_sources():
        if source.name == loaded.source:
            return source.input_size(loaded.arch, loaded.model)
    return None


def ordered_sources() -> list[ModelSource]:
    return MODEL_SOURCES.ordered()


def loaded(ckpt: CheckpointFile, model: nn.Module, fmt: str, arch: str | None, container: Any,
           opts: ModelOptions, notes: list[str], source: str) -> LoadedModel:
    """Find the head (the last registered affine layer) and check ``--num-classes`` against it."""
    path = ckpt.path
    layers = affine_modules(model)
    if not layers:
        raise FtdoctorError(
            f"the model in {path} has no affine layer (Linear or Conv) to serve as its head",
            "ftdoctor diagnoses classifiers whose last affine layer gives the class scores",
        )
    head_key, module = layers[-1]
    num_classes = int(module.weight.shape[0])
    if opts.num_classes is not None and opts.num_classes != num_classes:
        raise FtdoctorError(
            f"the head {head_key or '(root)'} of {path} has {num_classes} outputs, "
            f"not --num-classes {opts.num_classes}",
            f"drop --num-classes (it is read from the head) or pass --num-classes {num_classes}; "
            "--new-head replaces the head for a dataset with another class count",
        )
    return LoadedModel(model, path, ckpt.sha256, fmt, arch, num_classes, head_key, container, notes, source,
                       ckpt.scan)


def on_device(result: LoadedModel, device: torch.device) -> LoadedModel:
    if device.type != "cpu":
        try:
            result.model = result.model.to(device)
        except Exception as exc:
            raise FtdoctorError(f"cannot move the model to {device}: {_short(exc)}", "use --device cpu") from None
    result.model.eval()
    return result
