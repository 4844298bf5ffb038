"""What every model source shares: the options, the loaded model, its container, small helpers."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import open_regular

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")

STRIPPED_PREFIXES = ("module.", "model.")

AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_AFFINE_NAMES = frozenset(t.__name__ for t in AFFINE_TYPES)

_FORMAT_HELP = ("ftdoctor reads torch.save files (.pt .pth .bin .ckpt), .safetensors, TorchScript archives and "
                "ONNX files (.onnx)")


@dataclass(frozen=True)
class ModelOptions:
    """How to turn a checkpoint file into a model (the shared model options of SPEC §3)."""

    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    non_strict: bool = False
    device: str = "cpu"

    def flags(self) -> tuple[str, ...]:
        """The command-line flags that give these options (defaults left out), for printed commands."""
        out: list[str] = []
        if self.arch is not None:
            out += ["--arch", self.arch]
        if self.num_classes is not None:
            out += ["--num-classes", str(self.num_classes)]
        if self.trust_checkpoint:
            out.append("--trust-checkpoint")
        if self.non_strict:
            out.append("--non-strict")
        if self.device != "cpu":
            out += ["--device", self.device]
        return tuple(out)


@dataclass(frozen=True)
class Container:
    """Everything :func:`save_model` needs to write a model back the way it was read.

    ``wrapper`` is the file's top-level dict with the entry ``wrapper_key`` set
    to ``None``; its other entries (``epoch``, ``optimizer``, ...) are written
    back untouched. ``prefix`` is the key prefix stripped on load (``""``,
    ``"module."``, ``"model."``, ``"module.model."``) and restored on save.
    ``dtypes`` maps each stripped key to its stored dtype, in file order.
    ``metadata`` is the safetensors header metadata. ``folder`` is the layout of a model folder.
    """

    format: str
    wrapper_key: str | None = None
    wrapper: dict[str, Any] | None = None
    prefix: str = ""
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    metadata: Mapping[str, str] | None = None
    #: a model folder's layout (:class:`~.folder.FolderLayout`), None for a single file
    folder: Any = None
    #: an ONNX file's graph and where each torch tensor lives in it (:class:`~.onnx.OnnxLayout`)
    graph: Any = None


@dataclass
class LoadedModel:
    """A model ready to run (``eval()``, on the requested device) and where it came from.

    ``source`` is the name of the :class:`~ftdoctor.checkpoint.sources.ModelSource` that built it (and
    writes it back).
    """

    model: nn.Module
    path: Path
    sha256: str
    format: str
    arch: str | None
    num_classes: int
    head_key: str | None
    container: Container
    notes: list[str] = field(default_factory=list)
    source: str = ""
    #: what the pickle scan found in the file (:class:`~.pickle_scan.PickleScan`)
    scan: Any = None


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_regular(path, "the checkpoint") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def affine_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv1d/2d/3d layers (subclasses included) in registration order.

    Scripted modules are recognised by their original class name.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AFFINE_TYPES) or (
            isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in _AFFINE_NAMES
        ):
            found.append((name, module))
    return found


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _short(exc: BaseException, limit: int = 160) -> str:
    """One line naming an exception, without torch's boilerplate paragraphs."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if match:
        text = match.group(1)
    else:
        lines = [
            line.strip()
            for line in text.splitlines()
            if line.strip()
            and not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation"))
        ]
        text = lines[0] if lines else ""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(path: Path, reason: str, remedy: str | None = None) -> FtdoctorError:
    return FtdoctorError(
        f"{path} is not a readable checkpoint: {reason}",
        remedy or f"check that the file is complete (save or copy it again); {_FORMAT_HELP}",
    )


def _listing(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (", …" if len(items) > limit else "")


@contextlib.contextmanager
def _cwd_on_sys_path() -> Iterator[None]:
    """Import user code from the working directory, as ``python -m`` would (SPEC §3 --arch)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch/torchvision deprecation chatter (jit, weights=None, pickle protocol)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
