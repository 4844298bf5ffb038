"""What a checkpoint file may make ftdoctor allocate, checked before and right after ``torch.load`` (SPEC §8).

A few kilobytes can declare gigabytes: a zip entry that inflates a
thousandfold, a legacy ``torch.save`` pickle naming a storage far larger than
the file, a stride-0 view that turns one stored number into a 10⁵×10⁵ weight.
Each is measured against the file's own size and refused with a clear cause
before it is materialised:

* :func:`check_zip_entries` — the zip directory's declared (decompressed) sizes;
  ``torch.save`` stores entries uncompressed, so they may not exceed the file;
* :func:`check_legacy_storages` — the storage sizes a legacy (pre-1.6, non-zip)
  ``torch.save`` pickle declares, read from its opcodes without executing it;
* :func:`check_tensors` — after loading: no complex tensor, no view that covers
  more elements than its storage holds (stride 0, overlapping strides), and a
  total no larger than a small multiple of the file.
"""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import human_bytes, open_regular

# Decompressed zip entries may exceed the file by this factor (a re-zipped checkpoint compresses
# floats by ~1.1; a thousandfold is a bomb) ...
ZIP_RATIO = 2
# ... and loaded tensors may add up to this many times the file (tied weights share one storage).
TENSOR_RATIO = 4
_SLACK = 1 << 20

_REMEDY = "re-save the checkpoint with torch.save(model.state_dict(), PATH) from a trusted copy"

_ELEMENT_SIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "UntypedStorage": 1,
}


def _bomb(path: Path, declared: int, size: int, what: str) -> FtdoctorError:
    return FtdoctorError(
        f"{path} declares {human_bytes(declared)} of {what} in a file of {human_bytes(size)}; "
        "it was not loaded (a small file that expands this much is a decompression or allocation bomb)",
        _REMEDY)


def check_zip_entries(path: Path, size: int) -> None:
    """Refuse a zip whose entries declare more than :data:`ZIP_RATIO` × the file once decompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(max(0, info.file_size) for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return   # not a zip (or a broken one): the loader reports it
    if declared > ZIP_RATIO * size + _SLACK:
        raise _bomb(path, declared, size, "decompressed zip entries")


def check_legacy_storages(path: Path, size: int) -> None:
    """Refuse a legacy ``torch.save`` file whose storages declare more bytes than the file holds."""
    declared = sum(_legacy_storage_bytes(path))
    if declared > size + _SLACK:
        raise _bomb(path, declared, size, "tensor storage")


def _legacy_storage_bytes(path: Path, max_pickles: int = 6) -> Iterator[int]:
    """Bytes of each storage named by the persistent ids of the pickles at the start of ``path``.

    A legacy file's main pickle names each storage as a persistent id
    ``('storage', torch.<Type>Storage, key, location, numel, ...)``; torch
    allocates ``numel`` elements before reading them. This follows only the
    opcodes that build such tuples (strings, integers, globals, marks, memo):
    nothing is imported or called.
    """
    with open_regular(path, "the checkpoint") as f:
        for _ in range(max_pickles):
            stack: list[Any] = []
            memo: dict[Any, Any] = {}
            marks: list[int] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    name = op.name
                    if name in ("MARK",):
                        marks.append(len(stack))
                    elif name in ("GLOBAL",):
                        stack.append(("global", str(arg).split(" ")[-1]))
                    elif name == "STACK_GLOBAL":
                        attr = stack.pop() if stack else None
                        if stack:
                            stack.pop()
                        stack.append(("global", attr))
                    elif op.arg is not None and name not in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET",
                                                             "LONG_BINGET", "PROTO", "FRAME") \
                            and isinstance(arg, (str, int, bytes)) and name != "MEMOIZE":
                        stack.append(arg)
                    elif name in ("NONE", "NEWTRUE", "NEWFALSE", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
                        stack.append(None)
                    elif name == "TUPLE":
                        start = marks.pop() if marks else 0
                        items = tuple(stack[start:])
                        del stack[start:]
                        stack.append(items)
                    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                        k = int(name[-1])
                        items = tuple(stack[-k:]) if len(stack) >= k else ()
                        del stack[-k:]
                        stack.append(items)
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = stack[-1] if stack else None
                    elif name == "MEMOIZE":
                        memo[len(memo)] = stack[-1] if stack else None
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        stack.append(memo.get(arg))
                    elif name in ("BINPERSID", "PERSID"):
                        pid = stack.pop() if stack else None
                        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                            kind = pid[1][1] if isinstance(pid[1], tuple) else None
                            numel = pid[4]
                            if isinstance(numel, int):
                                yield max(0, numel) * _ELEMENT_SIZE.get(str(kind), 8)
                        stack.append(None)
                    elif name == "STOP":
                        break
                    elif name in ("POP",):
                        if stack:
                            stack.pop()
                    elif name == "POP_MARK":
                        start = marks.pop() if marks else 0
                        del stack[start:]
                    elif name in ("APPENDS", "SETITEMS", "DICT", "LIST", "FROZENSET", "ADDITEMS", "OBJ"):
                        start = marks.pop() if marks else 0
                        del stack[start:]
                        if name in ("DICT", "LIST", "FROZENSET", "OBJ"):
                            stack.append(None)
                    else:
                        # REDUCE, BUILD, SETITEM, APPEND, NEWOBJ, ...: consume what they take, push a result
                        pops = {"REDUCE": 2, "BUILD": 2, "SETITEM": 3, "APPEND": 2, "NEWOBJ": 2,
                                "NEWOBJ_EX": 3}.get(name, 0)
                        for _ in range(min(pops, len(stack))):
                            stack.pop()
                        if pops:
                            stack.append(None)
            except Exception:  # noqa: BLE001 - the end of the pickles (raw storage bytes follow)
                return


def _tensors(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        yield prefix or "(root)", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]", depth + 1)
    elif isinstance(obj, torch.nn.Module):
        for k, v in obj.state_dict(keep_vars=True).items():
            yield f"{prefix}.{k}" if prefix else k, v


def _covers_more_than_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` shows more elements than its storage holds from its offset (stride 0, overlaps)."""
    if t.numel() <= 1:
        return False
    if any(stride == 0 and n > 1 for stride, n in zip(t.stride(), t.shape)):
        return True
    try:
        available = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    except (RuntimeError, NotImplementedError):
        return False
    return t.numel() * t.element_size() > available


def check_tensors(obj: Any, path: Path, size: int) -> None:
    """Refuse complex tensors, views that repeat their storage, and totals far above the file's size."""
    total = 0
    for name, t in _tensors(obj):
        if t.is_complex():
            raise FtdoctorError(f"{path} holds the complex tensor {name} ({t.dtype})",
                                "ftdoctor diagnoses real-valued weights; store the model's real parameters")
        if _covers_more_than_storage(t):
            logical = t.numel() * t.element_size()
            raise FtdoctorError(
                f"{path}: the tensor {name} {tuple(t.shape)} is a view that repeats its storage (stride "
                f"{tuple(t.stride())}): {human_bytes(logical)} from a file of {human_bytes(size)}; it was not loaded",
                _REMEDY)
        total += t.numel() * t.element_size()
    if total > TENSOR_RATIO * size + _SLACK:
        raise _bomb(path, total, size, "tensors")

