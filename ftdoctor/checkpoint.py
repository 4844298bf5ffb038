"""Every model format in, every format out: safety, architecture matching, atomic writes.

SPEC §3 "Models" and §8. A checkpoint is untrusted input: it is read with
``torch.load(weights_only=True)`` and nothing else unless the user passes
``--trust-checkpoint``; a pickle that asks for more is refused, naming the
globals it wants. The formats:

* ``state_dict`` — a ``torch.save`` of a state dict, bare or wrapped in a dict
  (``state_dict``, ``model``, ``model_state_dict``, ``net``), keys possibly
  prefixed by ``module.`` (DataParallel) or ``model.`` (Lightning);
* ``safetensors`` — a ``.safetensors`` state dict;
* ``module`` — a full pickled ``nn.Module`` (needs ``--trust-checkpoint``);
* ``torchscript`` — a TorchScript archive (read only).

A state dict needs an architecture: ``--arch`` names a torchvision builder or
an import path ``pkg.module:callable``; without it the keys and shapes are
matched against torchvision's classification builders, built on the ``meta``
device so that matching costs no memory. :func:`save_model` writes a modified
model back the way it came (same format, wrapper dict, key names, prefix and
dtypes), atomically.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ftdoctor import bounds
from ftdoctor.errors import FtdoctorError
from ftdoctor.outputs import Output, atomic_write, check_outputs, sidecar_path
from ftdoctor.safety import open_regular, regular_file

__all__ = [
    "FORMATS",
    "Container",
    "LoadedModel",
    "ModelOptions",
    "affine_modules",
    "atomic_write",
    "check_output_path",
    "load_model",
    "save_model",
    "sha256_file",
    "validate_options",
    "write_sidecar",
]

FORMATS = ("state_dict", "safetensors", "module", "torchscript")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
STRIPPED_PREFIXES = ("module.", "model.")
AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AFFINE_NAMES = frozenset(t.__name__ for t in AFFINE_TYPES)
# Builders whose default configuration adds parameters a fine-tuned checkpoint
# usually lacks (pretrained weights switch the auxiliary classifiers off).
_BUILDER_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "googlenet": ({}, {"aux_logits": False}),
    "inception_v3": ({}, {"aux_logits": False}),
}
_FORMAT_HELP = "ftdoctor reads torch.save files (.pt .pth .bin .ckpt), .safetensors and TorchScript archives"


# --------------------------------------------------------------------------- options and results


@dataclass(frozen=True)
class ModelOptions:
    """How to turn a checkpoint file into a model (the shared model options of SPEC §3)."""

    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    non_strict: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class Container:
    """Everything :func:`save_model` needs to write a model back the way it was read.

    ``wrapper`` is the file's top-level dict with the entry ``wrapper_key`` set
    to ``None``; its other entries (``epoch``, ``optimizer``, ...) are written
    back untouched. ``prefix`` is the key prefix stripped on load (``""``,
    ``"module."``, ``"model."``, ``"module.model."``) and restored on save.
    ``dtypes`` maps each stripped key to its stored dtype, in file order.
    ``metadata`` is the safetensors header metadata.
    """

    format: str
    wrapper_key: str | None = None
    wrapper: dict[str, Any] | None = None
    prefix: str = ""
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    metadata: Mapping[str, str] | None = None


@dataclass
class LoadedModel:
    """A model ready to run (``eval()``, on the requested device) and where it came from."""

    model: nn.Module
    path: Path
    sha256: str
    format: str
    arch: str | None
    num_classes: int
    head_key: str | None
    container: Container
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- small helpers


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


# --------------------------------------------------------------------------- writing


def check_output_path(inp: Path, out: Path, force: bool) -> None:
    """Refuse to write onto the input, over an existing file without ``force``, or into a missing directory."""
    check_outputs([Output(Path(out), "-o", replace=False)], [inp], force=force)


def write_sidecar(out: Path, record: dict) -> Path:
    """Write ``OUT.ftdoctor.json`` (sorted keys, indent 2) atomically and return its path."""
    path = sidecar_path(out)
    text = json.dumps(record, sort_keys=True, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def save_model(loaded: LoadedModel, model: nn.Module, out: str | Path, *, force: bool = False) -> str:
    """Write ``model`` to ``out`` in ``loaded``'s format and container; return the file's sha256.

    A state dict keeps its wrapper dict (other entries untouched), key names,
    prefix and stored dtypes; a safetensors file keeps its metadata; a full
    pickled module stays one. TorchScript cannot be written back.
    """
    out = Path(out)
    box = loaded.container
    if box.format == "torchscript":
        raise FtdoctorError(
            f"{loaded.path} is a TorchScript archive, which ftdoctor cannot write back",
            "run the fix on the original eager checkpoint instead (a state dict with --arch NAME, "
            "or a pickled module with --trust-checkpoint)",
        )
    check_output_path(loaded.path, out, force)
    return _save(box, model, out)


def _save(box: Container, model: nn.Module, out: Path) -> str:
    if box.format == "module":
        payload = _wrap(box, _on_cpu(model))
        writer: Callable[[Path], None] = lambda tmp: torch.save(payload, tmp)
    elif box.format == "state_dict":
        payload = _wrap(box, _state_dict_for_save(model, box))
        writer = lambda tmp: torch.save(payload, tmp)
    elif box.format == "safetensors":
        from safetensors.torch import save_file

        tensors = _unshared(_state_dict_for_save(model, box))
        metadata = dict(box.metadata) if box.metadata else None
        writer = lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    else:  # pragma: no cover - Container is only made here
        raise ValueError(f"unknown checkpoint format {box.format!r}")
    return sha256_file(atomic_write(out, writer))


def _wrap(box: Container, payload: Any) -> Any:
    if box.wrapper_key is None or box.wrapper is None:
        return payload
    top = copy.copy(box.wrapper)
    top[box.wrapper_key] = payload
    return top


def _on_cpu(model: nn.Module) -> nn.Module:
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


def _state_dict_for_save(model: nn.Module, box: Container) -> OrderedDict[str, torch.Tensor]:
    """The model's tensors under the file's key names, in file order, with the file's dtypes."""
    own = model.state_dict()
    order = [k for k in box.dtypes if k in own] + [k for k in own if k not in box.dtypes]
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in order:
        tensor = own[k].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        stored = box.dtypes.get(k)
        if stored is not None and tensor.dtype != stored and tensor.is_floating_point() == stored.is_floating_point:
            tensor = tensor.to(stored)
        result[box.prefix + k] = tensor
    metadata = getattr(own, "_metadata", None)
    if metadata is not None:
        result._metadata = OrderedDict(  # type: ignore[attr-defined]
            ((box.prefix + k) if k else box.prefix[:-1], v) for k, v in metadata.items()
        )
    return result


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    result = {}
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        result[k] = t
    return result


# --------------------------------------------------------------------------- reading files


def load_model(path: str | Path, opts: ModelOptions = ModelOptions()) -> LoadedModel:
    """Read a checkpoint of any supported format into an ``eval()`` model on ``opts.device``.

    Every unusable input raises :class:`FtdoctorError` (cause + remedy).
    """
    path = Path(path)
    device = _parse_device(opts.device)
    if opts.num_classes is not None and opts.num_classes < 1:
        raise FtdoctorError(f"--num-classes {opts.num_classes} is not a class count", "give a positive integer")
    if path.is_dir():
        raise FtdoctorError(f"{path} is a directory, not a checkpoint file", "pass the checkpoint file itself")
    size = regular_file(path, "the checkpoint").st_size   # before any byte is read: no FIFO, no device
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise _unreadable(path, _short(exc), "check that the file is readable") from None
    if size == 0:
        raise _unreadable(path, "the file is empty")

    notes: list[str] = []
    if _looks_like_safetensors(path):
        state, metadata = _read_safetensors(path)
        bounds.check_tensors(state, path, size)
        box = Container("safetensors", metadata=metadata)
        return _from_state_dict(path, digest, state, box, opts, device, notes)
    bounds.check_zip_entries(path, size)
    if _looks_like_torchscript(path):
        return _from_torchscript(path, digest, opts, device, notes)
    if not _is_zip(path):
        bounds.check_legacy_storages(path, size)

    obj = _torch_load(path, opts.trust_checkpoint, notes)
    bounds.check_tensors(obj, path, size)
    wrapper_key, payload = _find_payload(path, obj, notes)
    wrapper = None
    if wrapper_key is not None:
        wrapper = copy.copy(obj)
        wrapper[wrapper_key] = None
    if isinstance(payload, nn.Module):
        box = Container("module", wrapper_key=wrapper_key, wrapper=wrapper)
        return _from_module(path, digest, payload, box, opts, device, notes)
    box = Container("state_dict", wrapper_key=wrapper_key, wrapper=wrapper)
    return _from_state_dict(path, digest, payload, box, opts, device, notes)


def validate_options(opts: ModelOptions) -> None:
    """Check ``--arch``, ``--device`` and ``--num-classes`` without reading any file (bad usage: FtdoctorError)."""
    _parse_device(opts.device)
    if opts.num_classes is not None and opts.num_classes < 1:
        raise FtdoctorError(f"--num-classes {opts.num_classes} is not a class count", "give a positive integer")
    if opts.arch is not None:
        _resolve_arch(opts.arch)


def _parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise FtdoctorError(f"unknown device {name!r}", "use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise FtdoctorError(f"ftdoctor cannot run on the {device.type} device (--device {name})",
                            "use --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise FtdoctorError(
                f"device {name} is not available ({count} CUDA device(s) found)", "use --device cpu"
            )
    return device


def _looks_like_safetensors(path: Path) -> bool:
    """The suffix, or the header: an 8-byte little-endian length followed by a JSON object."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open_regular(path, "the checkpoint") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own Rust-side error types
        raise _unreadable(path, f"broken safetensors file ({_short(exc)})") from None
    if not state:
        raise _unreadable(path, "the safetensors file holds no tensors")
    return state, (dict(metadata) if metadata else None)


def _is_zip(path: Path) -> bool:
    """``zipfile.is_zipfile`` without its exceptions (a damaged end record raises BadZipFile)."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001
        return False


def _looks_like_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's ``constants.pkl`` or ``code/`` entries."""
    try:
        if not _is_zip(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # noqa: BLE001 - any damage (even an unsupported compression method): not one
        return False
    for name in names:
        parts = name.split("/")
        inner = parts[1:] if len(parts) > 1 else parts
        if inner and (inner[0] == "constants.pkl" or (inner[0] == "code" and len(inner) > 1)):
            return True
    return False


def _torch_load(path: Path, trust: bool, notes: list[str]) -> Any:
    """``torch.load(weights_only=True)``; full unpickling only with ``--trust-checkpoint``.

    Before torch 2.6, ``weights_only=True`` itself could run code from a crafted
    file (CVE-2025-32434): under such a torch only ``--trust-checkpoint`` reads a pickle.
    """
    if not torch_is_safe():
        if not trust:
            raise FtdoctorError(
                f"{path} was not read: torch {torch.__version__} is older than 2.6, whose "
                "torch.load(weights_only=True) can run code from a crafted file (CVE-2025-32434)",
                "upgrade torch (pip install 'torch>=2.6'), or convert the checkpoint to .safetensors "
                "on a machine with a current torch")
        notes.append(f"torch {torch.__version__} < 2.6: read with --trust-checkpoint, fully unpickled")
        return _trusted_load(path)
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, str(exc))
        if not unsafe:
            raise _unreadable(
                path,
                _short(exc),
                "torch.load(weights_only=True) cannot read it; re-save it with torch.save(model.state_dict(), PATH) "
                "(or pass --trust-checkpoint if it is a pickle from a source you trust)",
            ) from None
        if not trust:
            raise FtdoctorError(
                f"{path} is a pickle that asks for {_listing(unsafe)}; unpickling it could run arbitrary code, "
                "so it was not loaded",
                "pass --trust-checkpoint only if you trust where this file comes from, "
                "or re-save it as a state dict or .safetensors",
            ) from None
    except Exception as exc:  # corrupt zip, truncated legacy pickle, random bytes, ...
        raise _unreadable(path, _corruption_reason(path, exc)) from None

    notes.append(f"loaded with --trust-checkpoint: fully unpickled (needs {_listing(unsafe, 3)})")
    return _trusted_load(path)


def torch_is_safe(version: str | None = None) -> bool:
    """Whether the installed torch (or ``version``) is 2.6 or newer (CVE-2025-32434 fixed)."""
    text = (version or torch.__version__).split("+")[0]
    parts = re.findall(r"\d+", text)[:2]
    major, minor = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)
    return (major, minor) >= (2, 6)


def _trusted_load(path: Path) -> Any:
    try:
        with _cwd_on_sys_path(), _quiet():
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FtdoctorError(
            f"{path} could not be unpickled even with --trust-checkpoint: {_short(exc)}",
            "run ftdoctor from the directory (or with the PYTHONPATH) where the model's classes can be imported",
        ) from None


def _corruption_reason(path: Path, exc: Exception) -> str:
    try:
        with open_regular(path, "the checkpoint") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    if magic == b"PK\x03\x04" and not _is_zip(path):
        return "a zip archive without its central directory (the file is truncated)"
    if isinstance(exc, RuntimeError) and "zip archive" in str(exc):
        return f"a damaged zip archive ({_short(exc)})"
    if isinstance(exc, EOFError):
        return "the file ends too early (truncated)"
    return f"not a torch.save file, safetensors or TorchScript archive ({_short(exc)})"


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """The globals a pickle imports beyond what ``weights_only`` allows, found without executing it."""
    names: list[str] = re.findall(r"GLOBAL ([\w.]+)", message)
    if _is_zip(path):
        with contextlib.suppress(Exception):
            names += torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    else:  # legacy torch.save files and raw pickles: get_unsafe_globals_in_checkpoint needs a zip
        allowed = _allowed_globals()
        names += [name for name in _pickle_globals(path) if name not in allowed]
    return list(dict.fromkeys(names))


def _allowed_globals() -> set[str]:
    allowed: set[str] = set()
    with contextlib.suppress(Exception):
        from torch import _weights_only_unpickler

        allowed |= set(_weights_only_unpickler._get_allowed_globals())
    with contextlib.suppress(Exception):
        for entry in torch.serialization.get_safe_globals():
            obj = entry[0] if isinstance(entry, tuple) else entry
            allowed.add(f"{obj.__module__}.{obj.__qualname__}")
    return allowed


_IDENTIFIER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)


def _pickle_globals(path: Path, max_pickles: int = 8) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the pickles at the start of a file.

    Uses ``pickletools.genops``, which only parses opcodes: nothing is imported
    or called. A legacy ``torch.save`` file is several pickles in a row
    followed by raw storage bytes, so parsing stops at the first failure.
    """
    found: list[str] = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            memo: dict[int, Any] = {}
            recent: list[Any] = []  # values of the last pushes, enough for STACK_GLOBAL
            try:
                for op, arg, _pos in pickletools.genops(f):
                    name = op.name
                    if name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                        recent.append(None)
                    elif name == "STACK_GLOBAL":
                        if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                            found.append(f"{recent[-2]}.{recent[-1]}")
                        recent.append(None)
                    elif name in _STRING_OPS:
                        recent.append(arg)
                    elif name == "MEMOIZE":
                        memo[len(memo)] = recent[-1] if recent else None
                    elif name in {"PUT", "BINPUT", "LONG_BINPUT"}:
                        memo[int(arg)] = recent[-1] if recent else None
                    elif name in {"GET", "BINGET", "LONG_BINGET"}:
                        recent.append(memo.get(int(arg)))
                    elif name in {"FRAME", "PROTO"}:
                        pass
                    else:
                        recent.append(None)
                    del recent[:-2]
            except Exception:  # not (or no longer) a pickle
                break
    return [name for name in dict.fromkeys(found) if _IDENTIFIER.fullmatch(name)]


def _find_payload(path: Path, obj: Any, notes: list[str]) -> tuple[str | None, Any]:
    """The state dict or module inside what ``torch.load`` returned, and the wrapper key holding it."""
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return None, obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module) or _is_state_dict(value):
                return key, value
        nested = [k for k, v in obj.items() if isinstance(k, str) and (_is_state_dict(v) or isinstance(v, nn.Module))]
        if len(nested) == 1:
            notes.append(f"model found under the checkpoint key {nested[0]!r}")
            return nested[0], obj[nested[0]]
        keys = [repr(k) for k in list(obj)[:8]]
        raise FtdoctorError(
            f"{path} holds a dict without a state dict (keys {', '.join(keys)})",
            "save the weights with torch.save(model.state_dict(), PATH), bare or under 'state_dict'",
        )
    raise FtdoctorError(
        f"{path} holds a {type(obj).__name__}, not a model or state dict",
        "save the weights with torch.save(model.state_dict(), PATH)",
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


# --------------------------------------------------------------------------- modules and TorchScript


def _head(model: nn.Module, path: Path) -> tuple[str, int]:
    layers = affine_modules(model)
    if not layers:
        raise FtdoctorError(
            f"the model in {path} has no affine layer (Linear or Conv) to serve as its head",
            "ftdoctor diagnoses classifiers whose last affine layer gives the class scores",
        )
    name, module = layers[-1]
    return name, int(module.weight.shape[0])


def _finish(
    path: Path,
    digest: str,
    model: nn.Module,
    fmt: str,
    arch: str | None,
    box: Container,
    opts: ModelOptions,
    device: torch.device,
    notes: list[str],
) -> LoadedModel:
    head_key, num_classes = _head(model, path)
    if opts.num_classes is not None and opts.num_classes != num_classes:
        raise FtdoctorError(
            f"the head {head_key or '(root)'} of {path} has {num_classes} outputs, not --num-classes {opts.num_classes}",
            f"drop --num-classes (it is read from the head) or pass --num-classes {num_classes}; "
            "--new-head replaces the head for a dataset with another class count",
        )
    if device.type != "cpu":
        try:
            model = model.to(device)
        except Exception as exc:
            raise FtdoctorError(f"cannot move the model to {device}: {_short(exc)}", "use --device cpu") from None
    model.eval()
    return LoadedModel(model, path, digest, fmt, arch, num_classes, head_key, box, notes)


def _from_module(
    path: Path, digest: str, module: nn.Module, box: Container, opts: ModelOptions, device: torch.device, notes: list[str]
) -> LoadedModel:
    if opts.arch is not None:
        notes.append(f"--arch {opts.arch} ignored: the file holds a full {type(module).__name__} module")
    return _finish(path, digest, module, "module", type(module).__name__, box, opts, device, notes)


def _from_torchscript(
    path: Path, digest: str, opts: ModelOptions, device: torch.device, notes: list[str]
) -> LoadedModel:
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
    return _finish(path, digest, module, "torchscript", arch, Container("torchscript"), opts, device, notes)


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Builder:
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
class _Signature:
    """What a builder's state dict looks like: key -> shape, and the head (last affine layer)."""

    shapes: dict[str, tuple[int, ...]]
    head: str | None

    def comparable(self) -> frozenset[str]:
        return _comparable(self.shapes)

    def head_outputs(self) -> int | None:
        shape = self.shapes.get(_key(self.head, "weight")) if self.head is not None else None
        return shape[0] if shape else None


def _comparable(keys: Any) -> frozenset[str]:
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

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _META_FACTORIES:
            if kwargs.get("device") is None:
                kwargs["device"] = "meta"
        elif args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.startswith("__"):
                return args[0]
        return func(*args, **kwargs)


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


_SIGNATURES: dict[tuple[str, tuple], _Signature | None] = {}


def _signature(builder: _Builder, **extra: Any) -> _Signature | None:
    """The builder's state-dict signature, built on ``meta`` once per process (None if it cannot be)."""
    kwargs = dict(builder.kwargs, **extra)
    cache_key = (builder.name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if builder.torchvision and cache_key in _SIGNATURES:
        return _SIGNATURES[cache_key]
    try:
        with _quiet(), _gc_paused(), _MetaParameters():
            model = builder.fn(**kwargs)
        if not isinstance(model, nn.Module):
            return None
        signature = _signature_of(model)
    except Exception:
        signature = None
    if builder.torchvision:
        _SIGNATURES[cache_key] = signature
    return signature


def _signature_of(model: nn.Module) -> _Signature:
    layers = affine_modules(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _Signature(shapes, layers[-1][0] if layers else None)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_builders(name: str) -> list[_Builder]:
    import torchvision

    fn = torchvision.models.get_model_builder(name)
    return [_Builder(name, fn, tuple(sorted(v.items()))) for v in _BUILDER_VARIANTS.get(name, ({},))]


def _resolve_arch(arch: str) -> list[_Builder]:
    """``--arch``: a torchvision classification builder or ``pkg.module:callable``."""
    if ":" in arch:
        return [_import_builder(arch)]
    names = _torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5) or ["resnet18", "vgg16_bn", "vit_b_16"]
        raise FtdoctorError(
            f"unknown architecture {arch!r}: not a torchvision classification model",
            f"did you mean {', '.join(close)}? (or an import path pkg.module:callable for your own model)",
        )
    return _torchvision_builders(arch)


def _import_builder(arch: str) -> _Builder:
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
    return _Builder(arch, obj, (), takes, torchvision=False)


def _image_size_kwargs(builder: _Builder, signature: _Signature, state: Mapping[str, torch.Tensor]) -> dict:
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


def _build_kwargs(
    builder: _Builder, signature: _Signature | None, state: Mapping[str, torch.Tensor], num_classes: int | None
) -> dict[str, Any]:
    kwargs = dict(builder.kwargs)
    if num_classes is not None and builder.takes_num_classes:
        kwargs["num_classes"] = num_classes
    if signature is not None:
        kwargs.update(_image_size_kwargs(builder, signature, state))
    return kwargs


def _head_classes(signature: _Signature | None, state: Mapping[str, torch.Tensor]) -> int | None:
    if signature is None or signature.head is None:
        return None
    weight = state.get(_key(signature.head, "weight"))
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _family(name: str) -> str:
    import torchvision

    return torchvision.models.get_model_builder(name).__module__


def _match_torchvision(path: Path, state: Mapping[str, torch.Tensor]) -> _Builder:
    """The unique torchvision classification builder whose keys and shapes fit ``state``.

    Candidates are built on ``meta``. A family (one torchvision module, e.g.
    ``resnet``) is only expanded when its smallest member has the same
    top-level modules and head as the state dict, which skips most builds.
    """
    keys = _comparable(state)
    top = {k.split(".", 1)[0] for k in keys}
    families: dict[str, list[_Builder]] = {}
    for name in _torchvision_names():
        families.setdefault(_family(name), []).extend(_torchvision_builders(name))

    tried: dict[str, tuple[float, str]] = {}  # label -> (key overlap, description), for the error message
    fits_keys: list[tuple[_Builder, _Signature]] = []

    def consider(builder: _Builder) -> _Signature | None:
        sig = _signature(builder)
        if sig is not None:
            theirs = sig.comparable()
            overlap = len(keys & theirs) / max(1, len(keys | theirs))
            tried[builder.label()] = (overlap, f"{overlap:.0%} of keys in common")
        return sig

    for members in families.values():
        if len(members) > 2:
            rep = min(members, key=lambda b: (len(b.name), b.name, len(b.kwargs)))
            sig = consider(rep)
            if (
                sig is None
                or {k.split(".", 1)[0] for k in sig.comparable()} != top
                or (sig.head is not None and _key(sig.head, "weight") not in state)
            ):
                continue
        for builder in members:
            sig = consider(builder)
            if sig is not None and sig.comparable() == keys:
                fits_keys.append((builder, sig))

    matches = []
    for builder, sig in fits_keys:
        classes = _head_classes(sig, state)
        extra = _build_kwargs(builder, sig, state, classes)
        extra = {k: v for k, v in extra.items() if k not in dict(builder.kwargs)}
        sized = _signature(builder, **extra) if extra else sig
        if sized is not None and all(tuple(state[k].shape) == sized.shapes.get(k) for k in keys):
            matches.append(builder)
        else:
            tried[builder.label()] = (1.0, "same keys, other shapes")
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FtdoctorError(
            f"the state dict in {path} fits several torchvision models: {_listing([b.label() for b in matches])}",
            "pass --arch with the one it was trained as",
        )
    closest = sorted(tried.items(), key=lambda kv: -kv[1][0])[:3]
    described = ", ".join(f"{label} ({text})" for label, (_, text) in closest) or "none could be built"
    raise FtdoctorError(
        f"the state dict in {path} ({len(state)} tensors) matches no torchvision classification model; "
        f"closest: {described}",
        "pass --arch NAME (a torchvision model) or --arch pkg.module:callable for your own model class",
    )


# --------------------------------------------------------------------------- state dicts


def _prefix_options(keys: list[str]) -> list[str]:
    """Prefixes that every key carries, stripped repeatedly: ``["", "module.", "module.model."]``."""
    options = [""]
    current = keys
    while current:
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in current):
                options.append(options[-1] + prefix)
                current = [k[len(prefix):] for k in current]
                break
        else:
            break
    return options


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> OrderedDict[str, torch.Tensor]:
    """The state dict without ``prefix``, keeping ``_metadata`` (module versions) in step."""
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix):] if k.startswith(prefix) else "", v)
            for k, v in metadata.items()
            if not prefix or k.startswith(prefix) or k == prefix[:-1]
        )
    return stripped


def _from_state_dict(
    path: Path,
    digest: str,
    raw: Mapping[str, torch.Tensor],
    box: Container,
    opts: ModelOptions,
    device: torch.device,
    notes: list[str],
) -> LoadedModel:
    options = _prefix_options(list(raw))
    prebuilt: nn.Module | None = None
    if opts.arch is not None:
        builder, signature, prefix = _choose_builder(_resolve_arch(opts.arch), raw, options)
        if signature is None and not builder.torchvision:
            # The callable does not build on meta (data-dependent code): build it for real, once.
            prebuilt = _build(builder, _build_kwargs(builder, None, {}, opts.num_classes))
            signature = _signature_of(prebuilt)
            builder, signature, prefix = _choose_builder([builder], raw, options, signature)
    else:
        prefix = options[-1]
        builder = _match_torchvision(path, _strip(raw, prefix))
        signature = _signature(builder)
        notes.append(f"architecture {builder.name} recognised from the state dict keys and shapes")
    if prefix:
        notes.append(f"stripped the key prefix {prefix!r} (restored when saving)")
    state = _strip(raw, prefix)

    classes = _head_classes(signature, state)
    if opts.num_classes is not None and classes is not None and classes != opts.num_classes:
        raise FtdoctorError(
            f"the head {signature.head} of {path} has {classes} outputs, not --num-classes {opts.num_classes}",  # type: ignore[union-attr]
            f"drop --num-classes (it is read from the head) or pass --num-classes {classes}; "
            "--new-head replaces the head for a dataset with another class count",
        )
    wanted = opts.num_classes or classes
    if prebuilt is not None and (wanted is None or not builder.takes_num_classes or wanted == signature.head_outputs()):  # type: ignore[union-attr]
        model = prebuilt
    else:
        kwargs = _build_kwargs(builder, signature, state, wanted)
        if "image_size" in kwargs and "image_size" not in dict(builder.kwargs):
            notes.append(f"image_size={kwargs['image_size']} read from the position embedding")
        model = _build(builder, kwargs)
    from ftdoctor.featurenorm import attach_feature_norms

    notes.extend(attach_feature_norms(model, state))  # heads written by `fix --method entame --feature-norm`
    _load_weights(model, state, builder.label(), opts.non_strict, path, notes)

    box = Container(
        box.format,
        wrapper_key=box.wrapper_key,
        wrapper=box.wrapper,
        prefix=prefix,
        dtypes={k: v.dtype for k, v in state.items()},
        metadata=box.metadata,
    )
    if builder.kwargs:
        notes.append(f"built as {builder.label()} to fit the checkpoint")
    return _finish(path, digest, model, box.format, builder.name, box, opts, device, notes)


def _choose_builder(
    builders: list[_Builder],
    raw: Mapping[str, torch.Tensor],
    options: list[str],
    known: _Signature | None = None,
) -> tuple[_Builder, _Signature | None, str]:
    """The builder variant and key prefix whose keys overlap the state dict most (ties: strip more)."""
    best: tuple[int, int, int] | None = None
    chosen: tuple[_Builder, _Signature | None, str] = (builders[0], known, options[-1])
    for b_index, builder in enumerate(builders):
        signature = known or _signature(builder)
        if signature is None:
            continue
        theirs = signature.comparable()
        for p_index, prefix in enumerate(options):
            keys = _comparable(k[len(prefix):] for k in raw)
            score = (len(keys & theirs) - len(keys ^ theirs), p_index, -b_index)
            if best is None or score > best:
                best, chosen = score, (builder, signature, prefix)
    return chosen


def _build(builder: _Builder, kwargs: dict[str, Any]) -> nn.Module:
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


def _load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, non_strict: bool, path: Path, notes: list[str]
) -> None:
    """``load_state_dict``: strict, or with ``--non-strict`` only the tensors whose key and shape fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not non_strict:
        if missing or unexpected or mismatched:
            parts = [
                f"{len(items)} {label} ({_listing(items)})"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("with another shape, file vs model", mismatched),
                )
                if items
            ]
            raise FtdoctorError(
                f"the state dict in {path} does not fit {arch}: " + "; ".join(parts),
                "pass the right --arch (or --non-strict to load only the tensors that fit)",
            )
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise FtdoctorError(
                f"the state dict in {path} does not load into {arch}: {_short(exc)}",
                "pass the right --arch (or --non-strict to load only the tensors that fit)",
            ) from None
        return

    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise FtdoctorError(
            f"none of the {len(state)} tensors in {path} fit {arch}, even with --non-strict",
            "pass the right --arch",
        )
    try:
        model.load_state_dict(fitting, strict=False)
    except Exception as exc:
        raise FtdoctorError(
            f"the state dict in {path} does not load into {arch}: {_short(exc)}", "pass the right --arch"
        ) from None
    for label, items in (
        ("missing from the checkpoint, left at their initial values", missing),
        ("in the checkpoint but not in the model, ignored", unexpected),
        ("with a different shape, left at their initial values", mismatched),
    ):
        if items:
            notes.append(f"--non-strict: {len(items)} tensors {label}: {_listing(items)}")
