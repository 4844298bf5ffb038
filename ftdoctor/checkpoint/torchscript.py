"""A TorchScript archive: a program (its modules' ``__setstate__`` runs on load and can write files), so it
is loaded only with ``--trust-checkpoint``; probed through autograd only (it runs no Python hooks), never
written back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftdoctor.checkpoint.common import (
    Container,
    LoadedModel,
    ModelOptions,
    _quiet,
    _short,
    _unreadable,
)
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import ModelSource, loaded, register_model_source
from ftdoctor.errors import FtdoctorError


@register_model_source(name="torchscript", priority=10)
class TorchScriptSource(ModelSource):
    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        return True if ckpt.format == "torchscript" else None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        path = ckpt.path
        if not opts.trust_checkpoint:
            raise FtdoctorError(
                f"{path} is a TorchScript archive: a program, and loading it runs code from the file (its "
                "modules' __setstate__, which can read and write files), so it was not loaded",
                "pass --trust-checkpoint only if you trust where this file comes from, "
                "or use the eager checkpoint (a state dict with --arch NAME, or .safetensors)")
        notes.append("loaded with --trust-checkpoint: a TorchScript program")
        try:
            with _quiet():
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise _unreadable(path, f"a broken TorchScript archive ({_short(exc)})") from None
        arch = getattr(module, "original_name", None) or type(module).__name__
        notes.append("TorchScript archive: usable for probes, not written back by fixes")
        if opts.arch is not None:
            notes.append(f"--arch {opts.arch} ignored: a TorchScript archive carries its own architecture")
        return loaded(ckpt, module, "torchscript", arch, Container("torchscript"), opts, notes, self.name)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        raise FtdoctorError(
            f"{loaded.path} is a TorchScript archive, which ftdoctor cannot write back",
            "run the fix on the original eager checkpoint instead (a state dict with --arch NAME, "
            "or a pickled module with --trust-checkpoint)",
        )
