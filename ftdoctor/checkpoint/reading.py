"""Reading a checkpoint file once, safely, before any model source looks at it (SPEC §3, §8).

:func:`read_checkpoint` checks the path (a regular file, not empty), hashes it,
bounds what it may make ftdoctor allocate (:mod:`ftdoctor.bounds`) and reads
it: a ``.safetensors`` state dict, a TorchScript archive (recognised by its
layout, not loaded: that needs ``--trust-checkpoint``, see
:mod:`.torchscript`), or a ``torch.save`` file through
``torch.load(weights_only=True)`` — full unpickling only with
``--trust-checkpoint``, and never under a torch older than 2.6
(CVE-2025-32434); a ``.onnx`` file is parsed as a protobuf (:mod:`.onnx_read`).
Before anything is unpickled, every pickle of the file is scanned
(:mod:`.pickle_scan`): one that names a global that can act is refused
without ``--trust-checkpoint``, naming the global and where it sits; one whose
extras are inert data (a Lightning ``.ckpt``'s hyper-parameters) is read with
them as placeholders (:mod:`.inert`).
"""
from __future__ import annotations

import copy
import pickle
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
    #: what the pickle scan found (:mod:`.pickle_scan`); None only for a file read without one
    scan: Any = None

    @property
    def format(self) -> str:
        return self.container.format

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor] | None:
        return self.payload if isinstance(self.payload, Mapping) else None


def read_checkpoint(path: Path, opts: ModelOptions, scan: Any = None) -> CheckpointFile:
    """Read ``path`` (every check of the module doc); FtdoctorError for anything unusable. A model folder
    (or a weight file inside one) is read whole (:mod:`.folder`). ``scan``: the checkpoint's
    :class:`~.pickle_scan.PickleScan` when the caller has made it already (``check``)."""
    from ftdoctor.checkpoint import folder

    found = folder.folder_of(path)
    if found is not None:
        return folder.read_folder(found, opts, given=path, scan=scan)
    if path.is_dir():
        folder.layout(path)     # raises: says what a model folder needs
    return read_file(path, opts, scan=scan)


def admit(scan: Any, trust: bool, notes: list[str]) -> None:
    """Refuse a checkpoint whose pickles name a global that can act (:mod:`.pickle_rules`), naming it and where
    it sits, unless ``trust`` (``--trust-checkpoint``): then say in ``notes`` what ran."""
    acting = scan.acting
    if not acting:
        return
    first = acting[0]
    more = f" (and {len(acting) - 1} more unsafe global(s))" if len(acting) > 1 else ""
    if trust:
        names = _listing([f.name for f in acting], 4)
        notes.append(f"loaded with --trust-checkpoint although its pickle names {names}: code from the file "
                     "ran as it loaded")
        return
    import shlex

    raise FtdoctorError(
        f"{scan.path} was not loaded: its pickle names {first.describe()}, which can run code when the file is "
        f"loaded ({first.reason}){more}",
        f"see every global it names with: ftdoctor check {shlex.quote(scan.path)}; pass --trust-checkpoint only "
        "if you made the file yourself")


def read_file(path: Path, opts: ModelOptions, scan: Any = None, part: bool = False) -> CheckpointFile:
    """One checkpoint file, with every check of the module doc; a folder's weight file with ``part`` (``scan``
    is then the folder's, admitted by :func:`~.folder.read_folder`)."""
    from ftdoctor.checkpoint.pickle_scan import scan_checkpoint

    size = regular_file(path, "the checkpoint").st_size   # before any byte is read: no FIFO, no device
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise _unreadable(path, _short(exc), "check that the file is readable") from None
    if size == 0:
        raise _unreadable(path, "the file is empty")
    notes: list[str] = []
    scan = scan or scan_checkpoint(path)
    if not part:
        admit(scan, opts.trust_checkpoint, notes)
    from ftdoctor.checkpoint import onnx

    if onnx.is_onnx(path):
        return onnx.read_onnx(path, digest, size, opts, notes, scan)
    if _looks_like_safetensors(path):
        state, metadata = _read_safetensors(path)
        bounds.check_tensors(state, path, size)
        return CheckpointFile(path, digest, size, state, Container("safetensors", metadata=metadata), notes, scan)
    bounds.check_zip_entries(path, size)
    if _looks_like_torchscript(path):
        return CheckpointFile(path, digest, size, None, Container("torchscript"), notes, scan)
    if not _is_zip(path):
        bounds.check_legacy_storages(path, size)
    obj = _torch_load(path, opts.trust_checkpoint, notes, _needs_more_than_weights(scan, path), bool(scan.acting))
    bounds.check_tensors(obj, path, size)
    wrapper_key, payload = _find_payload(path, obj, notes)
    wrapper = None
    if wrapper_key is not None:
        wrapper = copy.copy(obj)
        wrapper[wrapper_key] = None
    fmt = "module" if isinstance(payload, nn.Module) else "state_dict"
    return CheckpointFile(path, digest, size, payload, Container(fmt, wrapper_key=wrapper_key, wrapper=wrapper),
                          notes, scan)


def _needs_more_than_weights(scan: Any, path: Path) -> list[str]:
    """The globals of ``path``'s pickles beyond what ``weights_only`` allows (empty: it will do)."""
    from ftdoctor.checkpoint.pickle_rules import WEIGHTS

    mine = [f for f in scan.findings if not f.file or Path(scan.path) / f.file == path]
    return list(dict.fromkeys(f.name for f in mine if f.kind != WEIGHTS and not f.damage))


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


def _torch_load(path: Path, trust: bool, notes: list[str], beyond: list[str], acted: bool = False) -> Any:
    """``torch.load(weights_only=True)`` when the scan found nothing beyond weights; the inert reader for a
    training checkpoint whose extras are data (``beyond``, the scan's names); full unpickling only with
    ``--trust-checkpoint`` (``acted``: :func:`admit` has said which unsafe globals that runs).

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
    if not beyond:
        try:
            with _quiet():
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:   # what the scan took for weights, this torch does not allow
            beyond = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            if not beyond:                       # no global: an opcode weights_only does not take (FRAME)
                inert = None if trust else _inert_load(path, notes)
                if inert is not None:
                    return inert
                raise _unreadable(
                    path, _short(exc),
                    "torch.load(weights_only=True) cannot read it; re-save it with torch.save(model.state_dict(), "
                    "PATH) (or pass --trust-checkpoint if it is a pickle from a source you trust)") from None
        except Exception as exc:  # corrupt zip, truncated legacy pickle, random bytes, ...
            raise _unreadable(path, _corruption_reason(path, exc)) from None
    if trust:
        if not acted:
            notes.append(f"loaded with --trust-checkpoint: fully unpickled (needs {_listing(beyond, 3)})")
        return _trusted_load(path)
    inert = _inert_load(path, notes)
    if inert is not None:
        return inert
    raise FtdoctorError(
        f"{path} is a pickle of {_listing(beyond)}, not a state dict: building it needs those classes imported "
        "and run, so it was not loaded",
        "pass --trust-checkpoint only if you trust where this file comes from, "
        "or re-save it as a state dict or .safetensors",
    ) from None


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
    if names:
        notes.append(f"read without running anything from the file: {_listing(names, 4)} kept as inert "
                     "placeholders (not imported, not run) and written back as they were")
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
