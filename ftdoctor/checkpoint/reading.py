"""Reading a checkpoint file once, safely, before any model source looks at it (SPEC §3, §8).

:func:`read_checkpoint` checks the path (a regular file, not empty), hashes it,
bounds what it may make ftdoctor allocate (:mod:`ftdoctor.bounds`) and reads
it: a ``.safetensors`` state dict, a TorchScript archive (recognised by its
layout, not loaded: that needs ``--trust-checkpoint``, see
:mod:`.torchscript`), or a ``torch.save`` file through
``torch.load(weights_only=True)`` — full unpickling only with
``--trust-checkpoint``, and never under a torch older than 2.6
(CVE-2025-32434). A pickle that asks for more than tensors is refused, naming
the globals it wants, found without executing it.
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ftdoctor import bounds
from ftdoctor.checkpoint.common import (WRAPPER_KEYS, Container, ModelOptions, _cwd_on_sys_path, _listing, _quiet,
                                        _short, _unreadable, sha256_file)
from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import open_regular, regular_file


@dataclass
class CheckpointFile:
    """A checkpoint as read from disk: what it holds (``payload``: a state dict, a module, or None for a
    TorchScript archive not yet loaded) and how it is stored (``container``)."""

    path: Path
    sha256: str
    size: int
    payload: Any
    container: Container
    notes: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.container.format

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor] | None:
        return self.payload if isinstance(self.payload, Mapping) else None


def read_checkpoint(path: Path, opts: ModelOptions) -> CheckpointFile:
    """Read ``path`` (every check of the module doc); FtdoctorError for anything unusable. A model folder
    (or a weight file inside one) is read whole (:mod:`.folder`)."""
    from ftdoctor.checkpoint import folder

    found = folder.folder_of(path)
    if found is not None:
        return folder.read_folder(found, opts, given=path)
    if path.is_dir():
        folder.layout(path)     # raises: says what a model folder needs
    return read_file(path, opts)


def read_file(path: Path, opts: ModelOptions) -> CheckpointFile:
    """One checkpoint file (a folder's weight file too), with every check of the module doc."""
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
        return CheckpointFile(path, digest, size, state, Container("safetensors", metadata=metadata), notes)
    bounds.check_zip_entries(path, size)
    if _looks_like_torchscript(path):
        return CheckpointFile(path, digest, size, None, Container("torchscript"), notes)
    if not _is_zip(path):
        bounds.check_legacy_storages(path, size)
    obj = _torch_load(path, opts.trust_checkpoint, notes)
    bounds.check_tensors(obj, path, size)
    wrapper_key, payload = _find_payload(path, obj, notes)
    wrapper = None
    if wrapper_key is not None:
        wrapper = copy.copy(obj)
        wrapper[wrapper_key] = None
    fmt = "module" if isinstance(payload, nn.Module) else "state_dict"
    return CheckpointFile(path, digest, size, payload, Container(fmt, wrapper_key=wrapper_key, wrapper=wrapper),
                          notes)


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
            inert = _inert_load(path, notes)
            if inert is not None:
                return inert
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


def _inert_load(path: Path, notes: list[str]) -> Any:
    """A training checkpoint whose extras name code (a Lightning ``.ckpt``'s hyper-parameters, an optimizer):
    read with those globals as inert placeholders (:mod:`.inert`), nothing from the file run. None when what
    it holds is not a state dict beside such extras (a pickled module needs ``--trust-checkpoint``)."""
    from ftdoctor.checkpoint.inert import PickleModule, placeholders_in

    try:
        with _quiet():
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=PickleModule)
    except Exception:  # noqa: BLE001 - anything unusual: the refusal with its remedy stands
        return None
    try:
        key, payload = _find_payload(path, obj, [])
    except FtdoctorError:
        return None
    if not _is_state_dict(payload):
        return None
    names = placeholders_in(obj)
    notes.append(f"read without running anything from the file: {_listing(names, 4)} kept as inert placeholders "
                 "(not imported, not run) and written back as they were")
    return obj


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
