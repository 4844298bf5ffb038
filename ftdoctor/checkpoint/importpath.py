"""Your own model class: ``--arch pkg.module:callable``, imported with the working directory on ``sys.path``."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from torch import nn

from ftdoctor.checkpoint.builders import Builder
from ftdoctor.checkpoint.common import (
    LoadedModel,
    ModelOptions,
    _cwd_on_sys_path,
    _short,
)
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import ModelSource, loaded, register_model_source
from ftdoctor.checkpoint.state_dict import model_from_state_dict
from ftdoctor.checkpoint.writing import save_state_dict
from ftdoctor.errors import FtdoctorError


def import_builder(arch: str) -> Builder:
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise FtdoctorError(f"--arch {arch!r} is not an import path", "write it as pkg.module:callable")
    try:
        with _cwd_on_sys_path():
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise FtdoctorError(
            f"cannot import {module_name} for --arch {arch}: {_short(exc)}",
            f"run ftdoctor from the directory holding {module_name.replace('.', '/')}.py, or add it to PYTHONPATH",
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FtdoctorError(
                f"{module_name} has no attribute {attr!r} (--arch {arch})",
                "check the callable's name after the colon",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise FtdoctorError(f"--arch {arch} is not callable", "point at a model class or a function returning one")
    try:
        takes = "num_classes" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        takes = False
    return Builder(arch, obj, (), takes, torchvision=False)


@register_model_source(name="import-path", priority=80)
class ImportPathSource(ModelSource):
    """A state dict of a model built by ``pkg.module:callable`` (called with ``num_classes=C`` if it takes it)."""

    def accepts_arch(self, arch: str) -> bool:
        return ":" in arch and not arch.startswith("timm:")

    def check_arch(self, arch: str) -> None:
        import_builder(arch)

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        if ckpt.state_dict is None or opts.arch is None or not self.accepts_arch(opts.arch):
            return None
        return [import_builder(opts.arch)]

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        model, builder, box = model_from_state_dict(ckpt, opts, notes, builders=plan)
        return loaded(ckpt, model, box.format, builder.name, box, opts, notes, self.name)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        return save_state_dict(loaded.container, model, out)
