"""Writing a changed model back the way it was read: same format, wrapper dict, key names, prefix, dtypes.

Every write is atomic and checked against the inputs (:mod:`ftdoctor.outputs`).
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ftdoctor.checkpoint.common import Container, LoadedModel, sha256_file
from ftdoctor.outputs import Output, atomic_write, check_outputs, sidecar_path


def check_output_path(inp: Path, out: Path, force: bool) -> None:
    """Refuse to write onto the input, over an existing file without ``force``, or into a missing directory
    (a model folder's output is a folder: :func:`~.folder.output_is_folder`)."""
    from ftdoctor.checkpoint.folder import output_is_folder

    check_outputs([Output(Path(out), "-o", replace=False, directory=output_is_folder(inp))], [inp], force=force)


def write_sidecar(out: Path, record: dict) -> Path:
    """Write ``OUT.ftdoctor.json`` (sorted keys, indent 2) atomically and return its path."""
    path = sidecar_path(out)
    text = json.dumps(record, sort_keys=True, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


@dataclass(frozen=True)
class Saved:
    """What :func:`save_model` wrote: the output's sha256 and the pickle scan of the output."""

    sha256: str
    scan: Any


def save_model(loaded: LoadedModel, model: nn.Module, out: str | Path, *, force: bool = False,
               notes: list[str] | None = None, class_names: Sequence[str] | None = None) -> Saved:
    """Write ``model`` to ``out`` in ``loaded``'s format and container; return its sha256 and pickle scan.

    A state dict keeps its wrapper dict (other entries untouched, but for a head of another class count:
    :mod:`.retarget`, which says what it changed in ``notes``), key names, prefix and stored dtypes; a
    safetensors file keeps its metadata; a full pickled module stays one; a model folder's config gets the
    new class count (and ``class_names``, the data's, when they are known). TorchScript cannot be written back.

    The output is scanned like any input (:mod:`.pickle_scan`): it may name a global that can act only when the
    input did and was loaded with ``--trust-checkpoint`` (then ``notes`` get a warning); otherwise the write
    fails (and the command's journal removes it), so nothing ftdoctor writes carries code on unasked.
    """
    from ftdoctor.checkpoint.sources import MODEL_SOURCES

    out = Path(out)
    source = MODEL_SOURCES[loaded.source or _source_of(loaded.format)]
    if loaded.format != "torchscript":
        check_output_path(loaded.path, out, force)
    box = loaded.container
    classes = _head_outputs(model, loaded.head_key)
    if box.wrapper is not None and classes is not None and classes != loaded.num_classes:
        from ftdoctor.checkpoint.retarget import retarget

        wrapper, said = retarget(box.wrapper, loaded.num_classes, classes)
        loaded = replace(loaded, container=replace(box, wrapper=wrapper))
        if notes is not None:
            notes.extend(said)
    if box.folder is not None and classes is not None:
        from ftdoctor.checkpoint.folder import retarget_config

        found, said = retarget_config(box.folder, classes, class_names)
        loaded = replace(loaded, container=replace(loaded.container, folder=found))
        if notes is not None:
            notes.extend(said)
            if found.left_out:
                notes.append(f"not copied: {', '.join(found.left_out)} (links to files outside {loaded.path})")
    sha = source.save(loaded, model, out)
    return Saved(sha, _check_output(loaded, out, notes))


def _check_output(loaded: LoadedModel, out: Path, notes: list[str] | None) -> Any:
    """The pickle scan of a written output: unsafe globals only as the trusted input carried them."""
    from ftdoctor.checkpoint.pickle_scan import scan_checkpoint
    from ftdoctor.errors import FtdoctorError

    scan = scan_checkpoint(out)
    acting = scan.acting
    if not acting:
        return scan
    names = ", ".join(dict.fromkeys(f.name for f in acting))
    trusted = loaded.scan is not None and bool(loaded.scan.acting)
    if not trusted:
        raise FtdoctorError(f"the output {out} would name {names}, which can run code when it is loaded; nothing "
                            "was written", "report this: an output of ftdoctor must never carry code")
    if notes is not None:
        notes.append(f"warning: {out} carries the same code as its input ({names}): whoever loads it with full "
                     "unpickling runs it, as --trust-checkpoint ran it here")
    return scan


def _head_outputs(model: nn.Module, head_key: str | None) -> int | None:
    try:
        weight = (model.get_submodule(head_key) if head_key else model).weight
    except (AttributeError, RuntimeError):   # not there, or a ScriptModule (no get_submodule)
        return None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _source_of(fmt: str) -> str:
    """For a LoadedModel made without a source name (older callers): the source of its format."""
    return {"torchscript": "torchscript", "module": "pickled-module"}.get(fmt, "torchvision")


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through an open file. Given a path, torch names the archive's records after the file
    (here a random temporary name), so the same weights would give other bytes, and another sha256, on
    every run; through a file object the records are always ``archive/...``."""
    from ftdoctor.checkpoint.inert import PickleModule, placeholders_in

    with open(path, "wb") as f:
        if placeholders_in(obj):      # entries read as inert placeholders go back as the globals they were
            torch.save(obj, f, pickle_module=PickleModule)
        else:
            torch.save(obj, f)


def save_state_dict(box: Container, model: nn.Module, out: Path) -> str:
    """A state dict (``torch.save`` or ``.safetensors``) in ``box``'s container; its sha256."""
    if box.format == "safetensors":
        from safetensors.torch import save_file

        tensors = _unshared(_state_dict_for_save(model, box))
        metadata = dict(box.metadata) if box.metadata else None
        writer: Callable[[Path], None] = lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    else:
        payload = _wrap(box, _state_dict_for_save(model, box))
        writer = lambda tmp: torch_save(payload, tmp)
    return sha256_file(atomic_write(out, writer))


def save_module(box: Container, model: nn.Module, out: Path) -> str:
    """A full pickled module, in ``box``'s wrapper dict if it had one; its sha256."""
    payload = _wrap(box, _on_cpu(model))
    return sha256_file(atomic_write(out, lambda tmp: torch_save(payload, tmp)))


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
