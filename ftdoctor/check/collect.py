"""Which checkpoints ``check`` judges: files, model folders, directories (searched recursively) and globs, in
the order given. A model folder (``config.json`` beside its weights: Hugging Face, timm) is one checkpoint,
wherever it is found; the weight files inside it are not judged on their own."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from ftdoctor.errors import FtdoctorError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _files_in(directory: Path) -> list[Path]:
    from ftdoctor.checkpoint.folder import folder_of

    if folder_of(directory) == directory:
        return [directory]
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))   # .git, .venv, temporary files
        if Path(root) != directory and folder_of(Path(root)) == Path(root):
            found.append(Path(root))          # a model folder: one checkpoint, not its files
            dirs[:] = []
            continue
        names = [n for n in sorted(files) if not n.startswith(".") and n.lower().endswith(CHECKPOINT_SUFFIXES)]
        data = _onnx_external_data(Path(root), names)
        found += [Path(root) / n for n in names if n not in data]
    return found


def _onnx_external_data(root: Path, names: list[str]) -> set[str]:
    """The files an ONNX model of ``root`` keeps its external data in (``weights.bin``): part of that model,
    not checkpoints of their own."""
    models = [n for n in names if n.lower().endswith(".onnx")]
    if not models or len(models) == len(names):
        return set()
    from ftdoctor.checkpoint.onnx_read import external_files

    return {name for m in models for name in external_files(root / m)}


def collect_checkpoints(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, model folders, directories (searched recursively for .pt/.pth/.bin/.ckpt/.safetensors files
    and model folders, hidden entries skipped) and globs (``**`` recurses), in the order given, duplicates
    once (a weight file of a model folder counts as its folder)."""
    if not patterns:
        raise FtdoctorError("no checkpoint given", "pass one or more files, directories or globs")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        from ftdoctor.checkpoint.folder import folder_of

        if p.is_file() and folder_of(p) is not None:
            p = p.parent
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for pattern in patterns:
        text = str(pattern)
        p = Path(text)
        if p.is_dir():
            files = _files_in(p)
            if not files:
                raise FtdoctorError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) or model folders in "
                                f"directory {text}", "point ftdoctor check at the files, or at a directory that "
                                                     "holds them")
            for f in files:
                add(f)
        elif p.exists():
            add(p)
        elif _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = [m for f in matches for m in ([Path(f)] if Path(f).is_file() else _files_in(Path(f)))]
            if not files:
                raise FtdoctorError(f"the pattern {text!r} matches no checkpoint file",
                                    "check the glob (quote it so the shell passes it on; ** recurses)")
            for f in files:
                add(f)
        else:
            raise FtdoctorError(f"no such checkpoint: {text}", "check the path")
    return out
