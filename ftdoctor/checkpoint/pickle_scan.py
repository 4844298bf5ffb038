"""The pickle scan: every global each pickle of a checkpoint names, and what the pickle does with it, found
without running anything (SPEC §8). Which globals are weights, inert data or unsafe is :mod:`.pickle_rules`.

What is scanned, for a checkpoint given as a file or a model folder:

* a zip checkpoint (``torch.save``'s format, a Lightning ``.ckpt``, TorchScript): every ``.pkl`` entry
  (``data.pkl``; TorchScript's ``constants.pkl`` and debug pickles);
* the legacy ``torch.save`` format: its five pickles in a row (magic number, protocol, system info, the
  object, the storage keys); a raw pickle: the pickle;
* pickles stored inside a pickle (a bytes value that is one, as a nested loader would ``pickle.loads`` it);
* in a model folder, every file in it (subfolders too) that is a pickle: weight shards, ``training_args.bin``,
  ``optimizer.pt``, ``rng_state.pth``, ...

Each pickle is walked opcode by opcode with a symbolic stack (:mod:`.pickle_walk`), nothing imported or
called, so a global is judged by what the pickle does with it.

Not scanned, and said so: tensor storages (raw bytes, never unpickled), TorchScript's ``code/`` (a program in
TorchScript, not a pickle: classes whose code defines ``__setstate__`` run it on load and are unsafe), and
torch's pre-0.4 tar format (refused as unscanned).
"""
from __future__ import annotations

import io
import os
import pickletools
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftdoctor.checkpoint.pickle_rules import INERT, UNSAFE, WEIGHTS, Rule
from ftdoctor.checkpoint.pickle_walk import Finding, no_special, walk
from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import open_regular

#: the legacy ``torch.save`` format's first pickle holds this number
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PICKLES = 5
#: how many files of a model folder are scanned at most
MAX_FOLDER_FILES = 10_000
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill")
STORAGES = "tensor storages (raw bytes, never unpickled)"


@dataclass(frozen=True)
class PickleScan:
    """What :func:`scan_checkpoint` found in one checkpoint (a file or a model folder)."""

    path: str
    pickles: tuple[str, ...]
    findings: tuple[Finding, ...]
    not_scanned: tuple[str, ...] = ()

    @property
    def unsafe(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == UNSAFE)

    @property
    def inert(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == INERT)

    @property
    def safe(self) -> bool:
        return not self.unsafe

    @property
    def acting(self) -> tuple[Finding, ...]:
        """The unsafe findings that name something that acts (not damage: a damaged pickle fails to load under
        ``weights_only`` and the inert reader alike, which only ever run what was scanned before it)."""
        return tuple(f for f in self.unsafe if not f.damage)

    @property
    def verdict(self) -> str:
        return "unsafe" if self.unsafe else ("safe" if self.pickles else "no pickle")

    def summary(self) -> str:
        """One sentence: what was scanned and what it holds."""
        if not self.pickles and not self.unsafe:
            return "no pickle to scan" + (f" ({'; '.join(self.not_scanned)})" if self.not_scanned else "")
        scanned = f"{len(self.pickles)} pickle{'s' if len(self.pickles) != 1 else ''} scanned"
        if self.unsafe:
            more = f" and {len(self.unsafe) - 3} more" if len(self.unsafe) > 3 else ""
            return (f"{scanned}: {len(self.unsafe)} unsafe global(s): "
                    f"{'; '.join(f.describe() for f in self.unsafe[:3])}{more}; {self.unsafe[0].reason}")
        inert = self.inert
        text = f"{scanned}: no global that can act"
        if inert:
            names = ", ".join(f.name for f in inert[:6]) + (f" and {len(inert) - 6} more" if len(inert) > 6 else "")
            text += f"; read as inert data: {names}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "pickles": list(self.pickles),
                "unsafe": [f.to_json() for f in self.unsafe], "inert": [f.to_json() for f in self.inert],
                "not_scanned": list(self.not_scanned)}


# --- files and folders ------------------------------------------------------------------------------------

def scan_checkpoint(path: str | Path) -> PickleScan:
    """Scan a checkpoint file, or every file of a model folder, for the globals its pickles name."""
    path = Path(path)
    pickles: list[str] = []
    findings: list[Finding] = []
    not_scanned: list[str] = []
    if path.is_dir():
        files = _folder_files(path, not_scanned)
        for file in files:
            rel = file.relative_to(path).as_posix()
            if _looks_like_pickle_file(file):
                _scan_file(file, rel, pickles, findings, not_scanned)
    else:
        _scan_file(path, "", pickles, findings, not_scanned)
    order = {UNSAFE: 0, INERT: 1, WEIGHTS: 2}
    findings.sort(key=lambda f: order[f.kind])
    return PickleScan(str(path), tuple(pickles), tuple(findings), tuple(dict.fromkeys(not_scanned)))


def _folder_files(folder: Path, not_scanned: list[str]) -> list[Path]:
    from ftdoctor.safety import is_regular

    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_symlink() and not Path(os.path.realpath(p)).is_relative_to(os.path.realpath(folder)):
                not_scanned.append(f"{p.relative_to(folder)} (a link out of the folder: never read or copied)")
            elif is_regular(p):
                found.append(p)
            if len(found) >= MAX_FOLDER_FILES:
                not_scanned.append(f"files beyond the first {MAX_FOLDER_FILES}")
                return found
    return found


def _looks_like_pickle_file(path: Path) -> bool:
    """In a folder: a pickle suffix, a zip, or a file that starts as a pickle of protocol 2 to 5 does."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    try:
        with open_regular(path, "the file") as f:
            head = f.read(4)
    except (OSError, FtdoctorError):
        return False
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _scan_file(path: Path, rel: str, pickles: list[str], findings: list[Finding], not_scanned: list[str]) -> None:
    label = rel or path.name
    try:
        with open_regular(path, "the checkpoint") as f:
            head = f.read(16)
    except (OSError, FtdoctorError) as exc:      # a FIFO, a device, a dangling link: never read, by anyone here
        why = exc.cause if isinstance(exc, FtdoctorError) else exc.strerror
        not_scanned.append(f"{label}: not read ({why})")
        return
    if _safetensors_header(path, head):
        return
    if head[:2] == b"PK":
        _scan_zip(path, rel, label, pickles, findings, not_scanned)
        return
    if _is_tar(path):
        findings.append(Finding(UNSAFE, "a tar archive", "torch's format before 0.4, which ftdoctor does not scan "
                                "(its loader unpickles several members): re-save it with a current torch",
                                "?", rel, "", 0))
        return
    _scan_stream(path, rel, label, pickles, findings, not_scanned)


def _safetensors_header(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    try:
        return head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8
    except OSError:
        return False


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:  # noqa: BLE001
        return False


def _scan_stream(path: Path, rel: str, label: str, pickles: list[str], findings: list[Finding],
                 not_scanned: list[str]) -> None:
    """A raw pickle, or the legacy format's pickles in a row (then raw storages, not read)."""
    with open_regular(path, "the checkpoint") as f:
        if not _starts_like_pickle(f):
            return                              # not a pickle: nothing in it is unpickled
        first = walk(f, rel, "", no_special, findings)
        pickles.append(label)
        if first is None or first.values[1:2] != [LEGACY_MAGIC]:
            return
        for i in range(2, LEGACY_PICKLES + 1):
            name = f"pickle {i} of {LEGACY_PICKLES}"
            pickles.append(f"{label}: {name}")
            if walk(f, rel, name, no_special, findings) is None:
                return
    not_scanned.append(STORAGES)


def _starts_like_pickle(f: Any) -> bool:
    """Whether the file's first opcode parses (then the stream is back at its start)."""
    try:
        next(pickletools.genops(f))
        return True
    except Exception:  # noqa: BLE001 - not an opcode: the file is no pickle
        return False
    finally:
        f.seek(0)


def _scan_zip(path: Path, rel: str, label: str, pickles: list[str], findings: list[Finding],
              not_scanned: list[str]) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - a damaged archive: torch cannot read it either
        findings.append(Finding(UNSAFE, "a damaged zip archive", f"cannot be listed ({type(exc).__name__}): "
                                "its pickles cannot be scanned", "?", rel, "", 0, damage=True))
        return
    with archive:
        names = archive.namelist()
        code = {n for n in names if "/code/" in f"/{n}" and n.endswith(".py")}
        special = _torchscript_rules(archive, code) if code else no_special
        if code:
            not_scanned.append("TorchScript code in code/ (a program, not a pickle; classes that define "
                               "__setstate__ run it when loaded and are unsafe)")
        for name in names:
            if not name.endswith((".pkl", ".debug_pkl")):
                continue
            info = archive.getinfo(name)
            if info.file_size > (1 << 30):
                findings.append(Finding(UNSAFE, "an oversized pickle", f"{info.file_size} bytes: not scanned",
                                        "?", rel, name, 0))
                continue
            try:
                data = archive.read(name)
            except Exception as exc:  # noqa: BLE001 - bad CRC, unsupported compression
                findings.append(Finding(UNSAFE, "an unreadable pickle", f"cannot be read ({type(exc).__name__})",
                                        "?", rel, name, 0, damage=True))
                continue
            pickles.append(f"{label}: {name}")
            walk(io.BytesIO(data), rel, name, special, findings)
        if any(n.split("/", 1)[-1].startswith("data/") for n in names):
            not_scanned.append(STORAGES)


def _torchscript_rules(archive: zipfile.ZipFile, code: set[str]) -> Callable[[str, str], Rule | None]:
    """``__torch__.a.b.C``: a class compiled into the archive (``code/__torch__/a/b.py``); unsafe when its code
    defines ``__setstate__`` (TorchScript runs it on load, and TorchScript can write files)."""
    import ast

    by_module = {n.split("/code/", 1)[-1][:-3].replace("/", "."): n for n in code}

    def special(module: str, name: str) -> Rule | None:
        if module != "__torch__" and not module.startswith("__torch__."):
            return None
        entry = by_module.get(module)
        text = archive.read(entry).decode("utf-8", "replace") if entry else ""
        try:
            tree = ast.parse(text)
            node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
            sets = node is None and "__setstate__" in text or node is not None and any(
                isinstance(f, ast.FunctionDef) and f.name == "__setstate__" for f in node.body)
        except (SyntaxError, ValueError, RecursionError):
            sets = "__setstate__" in text
        if sets:
            return Rule(UNSAFE, "a TorchScript class whose code defines __setstate__, which runs when the archive "
                                "is loaded (TorchScript can read and write files)")
        return Rule(INERT, "a TorchScript class compiled into the archive (its code runs only when called)")

    return special
