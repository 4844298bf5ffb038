"""Model folders: a ``config.json`` beside the weights, as Hugging Face's ``save_pretrained`` and timm's hub
folders store them — read as one checkpoint, written back as a folder of the same layout.

A folder is recognised by its ``config.json``:

* **Hugging Face** (``model_type`` or ``architectures``): built by :mod:`.hf`;
* **timm** (``architecture``, a timm model name, with ``num_classes`` and ``model_args``): built by
  :mod:`.timm`.

Its weights are one of ``model.safetensors``, a sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json`` (safetensors first when both are
there). Every weight file is read like any checkpoint file (:func:`~.reading.read_checkpoint`: bounded,
``weights_only``), the JSON files with a size bound; nothing in the folder is imported or run. A weight
file or index inside such a folder names the folder (``probe model/model.safetensors`` reads
``model/``).

:func:`write_folder` writes a changed model back: the same weight files (a key goes to the shard it came
from), the config with its class count updated, every other top-level file (tokenizer, preprocessor
config, README) copied as it was — into a new folder that replaces ``-o`` whole, atomically
(:func:`ftdoctor.outputs.atomic_write_dir`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import is_regular, open_regular, regular_file

CONFIG = "config.json"
#: single weight files and shard indexes, in the order they are looked for
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
#: config.json and indexes are small; a larger one is not what it says it is
MAX_JSON_BYTES = 32 * 2**20
#: the folder kinds, and which model source builds them
KINDS = ("hf", "timm")


@dataclass(frozen=True)
class FolderLayout:
    """How a model folder stores its model: what :func:`write_folder` needs to write it back the same way.

    ``files``: the weight files in order; ``index``: the shard index's name (None: one file);
    ``weight_map``: key -> file for sharded weights; ``others``: the other top-level regular files,
    copied on write; ``left_out``: links to files elsewhere, never copied (:func:`_belongs`)."""

    kind: str
    config: Mapping[str, Any]
    files: tuple[str, ...]
    index: str | None = None
    index_metadata: Mapping[str, Any] = field(default_factory=dict)
    weight_map: Mapping[str, str] = field(default_factory=dict)
    others: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()      # links to files outside the folder: not copied on write

    @property
    def format(self) -> str:
        return "safetensors" if self.files[0].endswith(".safetensors") else "state_dict"

    def describe(self) -> str:
        what = {"hf": "Hugging Face", "timm": "timm"}[self.kind]
        if self.index:
            return f"a {what} folder ({len(self.files)} shards listed in {self.index})"
        return f"a {what} folder ({self.files[0]})"


def read_json(path: Path, what: str) -> Any:
    """A JSON file of at most :data:`MAX_JSON_BYTES`; FtdoctorError when it is not one."""
    size = regular_file(path, what).st_size
    if size > MAX_JSON_BYTES:
        raise FtdoctorError(f"{what} {path} is {size} bytes, more than a JSON config holds "
                            f"({MAX_JSON_BYTES // 2**20} MiB)", "check that the folder holds what it says")
    try:
        with open_regular(path, what) as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FtdoctorError(f"{what} {path} is not valid JSON ({type(exc).__name__}: {exc})",
                            "repair or re-create the file (save_pretrained writes it)") from None


def kind_of(config: Any) -> str | None:
    """``"timm"``, ``"hf"`` or None from a parsed ``config.json``."""
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("architecture"), str) and "model_type" not in config:
        return "timm"
    if isinstance(config.get("model_type"), str) or isinstance(config.get("architectures"), list):
        return "hf"
    return None


def folder_of(path: str | Path) -> Path | None:
    """The model folder ``path`` names: a directory with a ``config.json``, or a weight file or index inside a
    folder whose ``config.json`` is a Hugging Face or timm one. None otherwise (nothing is raised)."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG
        if not is_regular(config):
            return None
        try:                    # a training run's own config.json does not make its folder a model folder
            return path if kind_of(read_json(config, "the model config")) else None
        except FtdoctorError:
            return path         # a broken config.json: reading the folder says what is wrong with it
    name = path.name
    if name not in WEIGHT_FILES and name not in INDEX_FILES and not _SHARD.match(name):
        return None
    config = path.parent / CONFIG
    if not is_regular(config):
        return None
    try:
        return path.parent if kind_of(read_json(config, "the model config")) else None
    except FtdoctorError:
        return None


def layout(folder: Path) -> FolderLayout:
    """The layout of ``folder`` (config, weight files, shards, other files); FtdoctorError when it is none."""
    config_path = folder / CONFIG
    if not os.path.lexists(config_path):
        raise FtdoctorError(f"{folder} is a directory without a config.json, not a model folder",
                            "pass a checkpoint file, a Hugging Face save_pretrained folder or a timm hub folder")
    config = read_json(config_path, "the model config")
    kind = kind_of(config)
    if kind is None:
        raise FtdoctorError(f"{config_path} is neither a Hugging Face config (model_type, architectures) nor a "
                            "timm one (architecture, num_classes)",
                            "pass the weight file itself with --arch, or a folder written by save_pretrained "
                            "or timm's push_to_hub")
    files, index, metadata, weight_map = _weights(folder)
    used = {CONFIG, *files, *([index] if index else [])}
    candidates = sorted(
        entry for entry in folder.iterdir()
        if entry.name not in used and not entry.name.startswith(".") and is_regular(entry)
        and not (entry.name in WEIGHT_FILES or entry.name in INDEX_FILES or _SHARD.match(entry.name)))
    others = tuple(entry.name for entry in candidates if _belongs(entry, folder))
    left = tuple(entry.name for entry in candidates if not _belongs(entry, folder))
    return FolderLayout(kind, config, files, index, metadata, weight_map, others, left)


def _belongs(entry: Path, folder: Path) -> bool:
    """Whether a file of the folder is its own: not a link, a link within the folder, or a link into a
    Hugging Face cache's ``blobs/`` (its snapshots link there). A link elsewhere (``/etc/shadow``) is not
    copied into a written folder."""
    if not entry.is_symlink():
        return True
    target = Path(os.path.realpath(entry))
    home = Path(os.path.realpath(folder))
    return target.is_relative_to(home) or (target.parent.name == "blobs" and home.is_relative_to(
        target.parent.parent))


def _weights(folder: Path) -> tuple[tuple[str, ...], str | None, dict[str, Any], dict[str, str]]:
    for index_name, single in zip(INDEX_FILES, WEIGHT_FILES):
        if os.path.lexists(folder / index_name):
            index = read_json(folder / index_name, "the shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise FtdoctorError(f"{folder / index_name} has no weight_map of key -> file",
                                    "re-create the folder with save_pretrained")
            files = tuple(dict.fromkeys(weight_map.values()))
            for name in files:
                if "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or not name:
                    raise FtdoctorError(f"{folder / index_name} names the shard {name!r} outside the folder",
                                        "a shard index may only name files beside it")
            metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
            return files, index_name, dict(metadata), dict(weight_map)
        if os.path.lexists(folder / single):
            return (single,), None, {}, {}
    raise FtdoctorError(f"{folder} has a config.json but no weights ({', '.join(WEIGHT_FILES + INDEX_FILES)})",
                        "copy the weight files into the folder, or pass the weight file itself")


def read_folder(folder: Path, opts: Any, given: Path | None = None, scan: Any = None) -> Any:
    """A model folder as one :class:`~.reading.CheckpointFile`: the weights of every file merged under their
    keys (each file read like a checkpoint file), the layout in its container. Every file of the folder is
    scanned for pickles first (``scan``, unless given), since a fix copies the others into its output."""
    from ftdoctor.checkpoint.common import Container
    from ftdoctor.checkpoint.pickle_scan import scan_checkpoint
    from ftdoctor.checkpoint.reading import CheckpointFile, admit, read_file

    found = layout(folder)
    state: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    scan = scan or scan_checkpoint(folder)
    admit(scan, opts.trust_checkpoint, notes)
    if given is not None and given != folder:
        notes.append(f"{given.name} is part of the model folder {folder}: read the folder (its config.json says "
                     "how to build it)")
    for name in found.files:
        part = read_file(folder / name, opts, scan=scan, part=True)
        if part.state_dict is None:
            raise FtdoctorError(f"{folder / name} holds no state dict", "re-create the folder with save_pretrained")
        clash = [k for k in part.state_dict if k in state]
        if clash:
            raise FtdoctorError(f"{folder / name} repeats {len(clash)} keys of another shard ({clash[0]}, …)",
                                "re-create the folder with save_pretrained")
        state.update(part.state_dict)
        notes.extend(part.notes)
    digest, size = folder_digest(folder, files_of(found))
    container = Container(found.format, metadata=None, folder=found)
    return CheckpointFile(folder, digest, size, state, container, notes, scan)


def folder_digest(folder: Path, names: list[str]) -> tuple[str, int]:
    """A folder's sha256: over the sorted ``name sha256`` lines of its files ``names``; and their total size."""
    from ftdoctor.checkpoint.common import sha256_file

    lines, size = [], 0
    for name in sorted(names):
        size += regular_file(folder / name, "the model file").st_size
        lines.append(f"{name} {sha256_file(folder / name)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), size


def files_of(found: FolderLayout) -> list[str]:
    """Every file of the folder that a digest covers: config, index, weights and the others."""
    return [CONFIG, *([found.index] if found.index else []), *found.files, *found.others]


def write_folder(found: FolderLayout, source: Path, tensors: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any], out: Path) -> str:
    """Write a model folder like ``found`` (read from ``source``) to ``out``: ``tensors`` under their keys
    in the same weight files, ``config`` as ``config.json``, the other files copied. Returns its sha256."""
    from ftdoctor.outputs import atomic_write_dir

    def write(tmp: Path) -> None:
        _write_weights(found, tensors, tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in found.others:
            shutil.copyfile(source / name, tmp / name)

    atomic_write_dir(out, write)
    return folder_digest(out, files_of(found))[0]


def save_folder(loaded: Any, model: torch.nn.Module, out: Path) -> str:
    """Write ``model`` as a folder like the one ``loaded`` was read from (its keys, dtypes, files)."""
    from ftdoctor.checkpoint.writing import _state_dict_for_save

    found = loaded.container.folder
    return write_folder(found, loaded.path, _state_dict_for_save(model, loaded.container), found.config, out)


def _write_weights(found: FolderLayout, tensors: Mapping[str, torch.Tensor], tmp: Path) -> None:
    from ftdoctor.checkpoint.writing import _unshared, torch_save

    last = found.files[-1]
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in found.files}
    for key, tensor in tensors.items():
        groups[found.weight_map.get(key, last) if found.index else last][key] = tensor
    save: Callable[[dict[str, torch.Tensor], Path], None]
    if found.format == "safetensors":
        from safetensors.torch import save_file

        def save(group: dict[str, torch.Tensor], path: Path) -> None:
            save_file(_unshared(group), str(path), metadata={"format": "pt"})
    else:
        def save(group: dict[str, torch.Tensor], path: Path) -> None:
            torch_save(group, path)
    for name, group in groups.items():
        save(group, tmp / name)
    if found.index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {**found.index_metadata, "total_size": total},
                 "weight_map": {k: name for name, group in groups.items() for k in group}}
        (tmp / found.index).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def retarget_config(found: FolderLayout, classes: int,
                    names: Any = None) -> tuple[FolderLayout, list[str]]:
    """``found`` with its config's class count set to ``classes`` (a new head), and notes saying what changed:
    Hugging Face's ``id2label``/``label2id`` (the data's class ``names`` when there is one per class, else
    ``LABEL_i``) and ``num_labels``; timm's ``num_classes`` (also in ``pretrained_cfg``), its ``label_names``
    set to ``names`` or dropped."""
    from dataclasses import replace

    config = json.loads(json.dumps(found.config))      # a deep copy of plain JSON
    said: list[str] = []
    if found.kind == "hf":
        id2label = config.get("id2label")
        before = len(id2label) if isinstance(id2label, dict) and id2label else config.get("num_labels", 2)
        if before == classes:
            return found, said
        labels = [str(n) for n in names] if names is not None and len(names) == classes else \
            [f"LABEL_{i}" for i in range(classes)]
        config["id2label"] = {str(i): n for i, n in enumerate(labels)}
        config["label2id"] = {n: i for i, n in enumerate(labels)}
        if "num_labels" in config:
            config["num_labels"] = classes
        shown = ", ".join(labels[:5]) + (", …" if classes > 5 else "")
        said.append(f"config.json: {before} labels -> {classes} (id2label and label2id: {shown}), so "
                    "from_pretrained loads the new head")
    else:
        before = config.get("num_classes")
        if before == classes:
            return found, said
        config["num_classes"] = classes
        dropped = [k for k in ("label_names", "label_descriptions") if config.pop(k, None) is not None]
        if names is not None and len(names) == classes:
            config["label_names"] = [str(n) for n in names]
            dropped = [d for d in dropped if d != "label_names"]
        cfg = config.get("pretrained_cfg")
        if isinstance(cfg, dict):
            if "num_classes" in cfg:
                cfg["num_classes"] = classes
            dropped += [f"pretrained_cfg.{k}" for k in ("label_names", "label_descriptions")
                        if cfg.pop(k, None) is not None]
        said.append(f"config.json: num_classes {before} -> {classes}"
                    + (f" ({', '.join(dropped)} dropped: they named the old classes)" if dropped else ""))
    return replace(found, config=config), said


def output_is_folder(model_path: str | Path) -> bool:
    """Whether a fix of ``model_path`` writes a folder (its input is a model folder or a file inside one)."""
    return folder_of(model_path) is not None
