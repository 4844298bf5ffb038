"""Every file a command writes: checked against its inputs before any work, kept all or none (SPEC §8).

A command declares its outputs (:class:`Output`) and its inputs, and runs
inside :func:`journal`:

* before any work, :func:`check_outputs` refuses an output that is one of the
  inputs (the same file through symlinks or hard links included) or an
  existing file inside an input directory, two outputs that are one file, a
  directory in an output's place, a missing or unwritable output directory,
  and an existing file that may only be replaced with ``--force``;
* every write goes through :func:`atomic_write` (temporary file, fsync,
  rename), which the journal records; a file it replaces is kept aside;
* when the command fails — an error, Ctrl-C, SIGTERM, a late write error —
  the journal removes what it created and puts back what it replaced, so no
  new file is left and no old one is lost; on success the set-aside copies go.

Renames and roll-backs run in a :func:`critical` section: a signal arriving
there is held until the section ends, so a command is interrupted either
before its outputs were complete (and then rolled back) or after.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ftdoctor.errors import FtdoctorError

__all__ = ["Output", "atomic_write", "atomic_write_dir", "check_outputs", "committed", "critical", "start_command",
           "journal", "sidecar_path"]


@dataclass(frozen=True)
class Output:
    """A file a command will write. ``replace``: an existing file there may be replaced without ``--force``
    (reports, pictures); checkpoints and their sidecars need ``--force``. ``flag`` names the option.
    ``directory``: the output is a folder (a Hugging Face or timm model folder), written whole by
    :func:`atomic_write_dir`."""

    path: Path
    flag: str
    replace: bool = True
    directory: bool = False


def sidecar_path(out: str | Path) -> Path:
    """``OUT.ftdoctor.json``: the record written next to a checkpoint ftdoctor writes."""
    out = Path(out)
    return out.with_name(out.name + ".ftdoctor.json") if out.name else Path(f"{out}.ftdoctor.json")


# -- checking -----------------------------------------------------------------------------------------
def _canonical(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    if _canonical(a) == _canonical(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)   # hard links
    return False


def _inside(path: Path, directory: Path) -> bool:
    try:
        _canonical(path).relative_to(_canonical(directory))
        return True
    except ValueError:
        return False


def _writable(directory: Path) -> str | None:
    """None when a file can be created in ``directory``, else why not (tried, not guessed: root ignores modes)."""
    probe = directory / f".ftdoctor-probe-{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | Path | None] = (), *,
                  force: bool = False) -> list[Output]:
    """Refuse, before any work, every output that would destroy data or could not be written.

    ``inputs`` are the files and directories the command reads (``None`` entries are skipped).
    Returns the outputs with a path, in order.
    """
    outs = [o for o in outputs if o.path is not None]
    ins = [Path(p) for p in inputs if p is not None and str(p) != ""]
    seen: list[Output] = []
    for o in outs:
        path = Path(o.path)
        if path.name in ("", ".", ".."):
            raise FtdoctorError(f"{o.flag} {str(o.path)!r} names no {'folder' if o.directory else 'file'}",
                                f"give {o.flag} a {'folder' if o.directory else 'file'} name")
        for other in seen:
            if _same_file(path, other.path):
                raise FtdoctorError(f"{o.flag} and {other.flag} both name {path}",
                                    "give each output its own file name")
        for inp in ins:
            if _same_file(path, inp):
                raise FtdoctorError(f"refusing to overwrite the input {inp} (given as {o.flag} {path})",
                                    f"choose another file name for {o.flag} (ftdoctor never writes over an input)")
            if inp.is_dir() and os.path.lexists(path) and _inside(path, inp):
                raise FtdoctorError(f"refusing to overwrite {path} (given as {o.flag}): it is an existing file "
                                    f"inside the input directory {inp}",
                                    f"choose a file name for {o.flag} outside {inp}")
            if o.directory and inp.is_dir() and _inside(path, inp):
                raise FtdoctorError(f"refusing to write the folder {path} (given as {o.flag}) inside the input "
                                    f"directory {inp}", f"choose a folder for {o.flag} outside {inp}")
            if o.directory and os.path.lexists(inp) and _inside(inp, path):
                raise FtdoctorError(f"refusing to replace the folder {path} (given as {o.flag}): it holds the "
                                    f"input {inp}", f"choose a new folder name for {o.flag}")
        if o.directory:
            _check_directory_output(path, o, force)
        else:
            if path.is_dir():
                raise FtdoctorError(f"{o.flag} {path} is a directory", f"give {o.flag} a file name")
            if os.path.lexists(path) and not os.path.isfile(path) and os.path.exists(path):
                raise FtdoctorError(f"{o.flag} {path} exists and is not a regular file",
                                    f"choose another file name for {o.flag}")
        if os.path.lexists(path) and not o.replace and not force:
            raise FtdoctorError(f"{o.flag} {path} already exists", f"pass --force to replace it, or choose another "
                                                                   f"file name for {o.flag}")
        parent = path.parent
        if not parent.is_dir():
            raise FtdoctorError(f"the directory of {o.flag} {path} does not exist ({parent})",
                                "create it first, or choose another output path")
        why = _writable(parent)
        if why is not None:
            raise FtdoctorError(f"cannot write {o.flag} {path}: {why} in {parent}",
                                "choose a writable directory for the output")
        seen.append(Output(path, o.flag, o.replace, o.directory))
    return seen


def _check_directory_output(path: Path, o: Output, force: bool) -> None:
    """A folder output: a new name, or (with ``--force``) an existing folder that is replaced whole."""
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_dir()):
        raise FtdoctorError(f"{o.flag} {path} exists and is not a folder",
                            f"give {o.flag} a new folder name (the model is written as a folder, like its input)")
    if path.is_dir() and not force:
        raise FtdoctorError(f"{o.flag} {path} already exists",
                            f"pass --force to replace the whole folder, or choose another folder name for {o.flag}")


# -- signals ------------------------------------------------------------------------------------------
_critical_depth = 0
_held: list[int] = []


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (with :func:`install_signal_handlers`) until the block is done."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
    if _critical_depth == 0 and _held:
        signum = _held[0]
        _held.clear()
        _raise_for(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up path runs."""


_received: list[int] = []


def received_signal() -> int | None:
    """The signal that interrupted this command (SIGINT or SIGTERM), if one did."""
    return _received[-1] if _received else None


def _raise_for(signum: int) -> None:
    _received.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _handler(signum: int, frame: object) -> None:
    if _critical_depth > 0:
        _held.append(signum)
        return
    _raise_for(signum)


def start_command() -> None:
    """At the start of a command: SIGINT and SIGTERM raise (``KeyboardInterrupt`` / :class:`Terminated`)
    outside critical sections, and no output counts as kept yet."""
    _committed.clear()
    _received.clear()
    with contextlib.suppress(ValueError):   # not the main thread: leave the handlers alone
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


# -- the journal --------------------------------------------------------------------------------------
class Journal:
    """What a command wrote so far, to undo on failure (see the module doc)."""

    def __init__(self, inputs: Sequence[Path]) -> None:
        self.inputs = list(inputs)
        self.planned: list[Output] = []
        self.created: list[Path] = []
        self.replaced: list[tuple[Path, Path]] = []     # (path, the old file set aside)

    def plan(self, outputs: Iterable[Output], inputs: Iterable[str | Path | None], force: bool) -> None:
        new_inputs = [Path(p) for p in inputs if p is not None]
        self.inputs.extend(new_inputs)
        # What this command wrote already is complete: its later steps may read it (the demo probes the
        # checkpoint its fix step wrote). What it planned and has not written must not be read meanwhile.
        written = [*self.created, *(p for p, _ in self.replaced)]
        pending = [o for o in self.planned if not any(_same_file(Path(o.path), w) for w in written)]
        # a nested call planning what its caller planned already (the CLI, then the library) adds nothing
        fresh = [o for o in outputs if not any(_same_file(Path(o.path), p.path) for p in pending)]
        self.planned = check_outputs([*pending, *fresh], self.inputs, force=force)

    def install(self, tmp: Path, out: Path) -> None:
        """Move the complete ``tmp`` onto ``out``, keeping any old ``out`` aside until :meth:`commit`."""
        with critical():
            if any(_canonical(out) == _canonical(p) for p in self.created) or \
                    any(_canonical(out) == _canonical(p) for p, _ in self.replaced):
                if os.path.isdir(out) and not os.path.islink(out):
                    _remove(out)          # written twice by this command: its own earlier version goes
                os.replace(tmp, out)
                return
            if os.path.lexists(out):
                aside = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
                os.rename(out, aside)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.rename(aside, out)
                    raise
                self.replaced.append((out, aside))
            else:
                os.replace(tmp, out)
                self.created.append(out)

    def rollback(self) -> list[Path]:
        """Remove what this command created, put back what it replaced; returns what could not be undone."""
        left: list[Path] = []
        with critical():
            for path in reversed(self.created):
                try:
                    _remove(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(path)
            for path, aside in reversed(self.replaced):
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        _remove(path)
                    os.replace(aside, path)
                except OSError:
                    left.append(path)
            self.created.clear()
            self.replaced.clear()
        return left

    def commit(self) -> list[Path]:
        """Keep everything written; drop the set-aside old files. Returns the files written."""
        with critical():
            for _, aside in self.replaced:
                with contextlib.suppress(OSError):
                    _remove(aside)
            written = [*self.created, *(p for p, _ in self.replaced)]
            self.created.clear()
            self.replaced.clear()
        _committed.extend(written)
        return written


def _remove(path: Path) -> None:
    """Delete a file, or a folder this command wrote (or set aside) with everything in it."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


_active: contextvars.ContextVar[Journal | None] = contextvars.ContextVar("ftdoctor_journal", default=None)
_committed: list[Path] = []


def committed() -> list[Path]:
    """Files this process's commands have completed (for an honest message after a late interrupt)."""
    return list(_committed)


@contextlib.contextmanager
def journal(outputs: Iterable[Output] = (), inputs: Iterable[str | Path | None] = (), *,
            force: bool = False) -> Iterator[Journal]:
    """Check ``outputs`` against ``inputs`` now; undo every write of the block if it fails.

    Nested journals join the outermost one: a library call that writes (``fix``)
    inside a command that writes more (``demo``) is kept or undone with it.
    """
    current = _active.get()
    if current is not None:
        current.plan(outputs, inputs, force)
        yield current
        return
    jr = Journal([])
    jr.plan(outputs, inputs, force)
    token = _active.set(jr)
    try:
        yield jr
    except BaseException as exc:
        left = jr.rollback()
        if left and isinstance(exc, FtdoctorError):
            exc.cause += f" (could not remove {', '.join(map(str, left))})"
        raise
    else:
        jr.commit()
    finally:
        _active.reset(token)


def atomic_write(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``out``, fsync it, then rename it onto ``out``.

    On any exception (KeyboardInterrupt included) the temporary file is removed
    and the exception re-raised: ``out`` is either untouched or complete. Inside
    a :func:`journal` the rename is recorded, so a later failure of the command
    undoes it. Returns ``out``.
    """
    # O_EXCL reserves the name; the mode follows the umask like any new file.
    return _atomic(Path(out), write, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                                   0o666)), "")


def atomic_write_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """:func:`atomic_write` for a folder: ``write(tmp)`` fills a new temporary folder next to ``out``, whose
    files are fsynced before it is renamed onto ``out`` (an existing ``out`` is set aside until the command
    succeeds, then removed; put back if it fails). Returns ``out``."""
    return _atomic(Path(out), write, os.mkdir, "the folder ")


def _atomic(out: Path, write: Callable[[Path], None], reserve: Callable[[Path], None], what: str) -> Path:
    while True:
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
        try:
            reserve(tmp)
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        for entry in ([tmp] if tmp.is_file() else sorted(tmp.rglob("*"))):
            if entry.is_file() and not entry.is_symlink():
                _fsync(entry, os.O_RDWR if entry == tmp else os.O_RDONLY)
        current = _active.get()
        if current is not None:
            current.install(tmp, out)
        else:
            with critical():
                aside = None
                if tmp.is_dir() and os.path.isdir(out) and not os.path.islink(out):
                    aside = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
                    os.rename(out, aside)
                os.replace(tmp, out)
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
    except BaseException as exc:
        with critical(), contextlib.suppress(OSError):
            _remove(tmp)
        if isinstance(exc, OSError):   # disk full, quota, permissions changed during the run
            raise FtdoctorError(f"writing {what}{out} failed: {exc.strerror or exc}; nothing was written",
                                "check the disk space and permissions of the output directory, then run "
                                "again") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
        _fsync(out.parent, os.O_RDONLY)
    return out


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
