"""A full pickled ``nn.Module`` (``torch.save(model)``): read only with ``--trust-checkpoint``, written back as one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ftdoctor.checkpoint.common import LoadedModel, ModelOptions
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import ModelSource, loaded, register_model_source
from ftdoctor.checkpoint.writing import save_module


@register_model_source(name="pickled-module", priority=20)
class PickledModuleSource(ModelSource):
    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        return ckpt.payload if isinstance(ckpt.payload, nn.Module) else None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        if opts.arch is not None:
            notes.append(f"--arch {opts.arch} ignored: the file holds a full {type(plan).__name__} module")
        return loaded(ckpt, plan, "module", type(plan).__name__, ckpt.container, opts, notes, self.name)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        return save_module(loaded.container, model, out)
