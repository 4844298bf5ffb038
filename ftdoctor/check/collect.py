"""Which files ``check`` judges: files, directories (searched recursively) and globs, in the order given."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from ftdoctor.errors import FtdoctorError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _files_in(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))   # .git, .venv, temporary files
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(CHECKPOINT_SUFFIXES):
                found.append(Path(root) / name)
    return found


def collect_checkpoints(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, directories (searched recursively for .pt/.pth/.bin/.ckpt/.safetensors, hidden
    entries skipped) and globs (``**`` recurses), in the order given, duplicates once."""
    if not patterns:
        raise FtdoctorError("no checkpoint given", "pass one or more files, directories or globs")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
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
                raise FtdoctorError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in directory {text}",
                                    "point ftdoctor check at the files, or at a directory that holds them")
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
