"""Data sources: the registry of what ``--data`` may name (timm's ``register_model`` pattern).

A :class:`DataSource` claims a ``--data`` value (a name like ``cifar10``, or a
path it recognises), opens its capped split (see :mod:`.arrays` for what a
split is) and names the files it reads (so that no output lands on them).
Sources are asked in priority order. Adding one is a module with a
:class:`DataSource` subclass decorated with :func:`register_data_source`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from ftdoctor.errors import FtdoctorError
from ftdoctor.registry import Registry

DATA_SOURCES = Registry("data source", instances=True)
#: class decorator: make a data source available to every command's ``--data``
register_data_source = DATA_SOURCES.register


class DataSource:
    """One kind of ``--data``; subclass and decorate with :func:`register_data_source`."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 100
    #: how ``--help`` and error hints name it: data names ("cifar10"), or a phrase for paths
    names: ClassVar[tuple[str, ...]] = ()
    #: path sources: the file suffixes they read (".npz"); a directory source: ("/",)
    suffixes: ClassVar[tuple[str, ...]] = ()

    def claims(self, data: str) -> bool:
        """Whether ``--data DATA`` is this source's."""
        return False

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        """The capped split of ``opts.split`` and the name reports show for it."""
        raise NotImplementedError

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        """The files or directories it reads (no output may be one of them)."""
        return [Path(data).expanduser()]


def ordered_sources() -> list[DataSource]:
    return DATA_SOURCES.ordered()


def names_hint() -> str:
    """'use one of: shapes, ..., svhn; a directory of images; or a .h5/.hdf5/.npz file'."""
    sources = ordered_sources()
    names = [n for s in sources if not s.suffixes for n in s.names]
    paths = ["a directory of images"] if any("/" in s.suffixes for s in sources) else []
    suffixes = [x for s in sources for x in s.suffixes if x != "/"]
    if suffixes:
        paths.append("a " + "/".join(suffixes) + " file")
    text = "use one of: " + ", ".join(names)
    if paths:
        text += "; " + "; ".join(paths[:-1]) + ("; " if len(paths) > 1 else "") + "or " + paths[-1]
    return text


def source_for(data: str) -> DataSource | None:
    return next((s for s in ordered_sources() if s.claims(data)), None)


def open_split(opts: Any) -> tuple[Any, str]:
    """(split, display name) for ``opts.data``; one error with a remedy when nothing claims it."""
    data = opts.data.strip()
    source = source_for(data)
    if source is not None:
        return source.open(data, opts)
    path = Path(data).expanduser()
    if os.path.exists(path) and not path.is_file():
        from ftdoctor.safety import regular_file
        regular_file(path, "the data file")   # a FIFO or device: refused before it is opened
    if path.exists():
        raise FtdoctorError(f"cannot use {path} as data: unknown file type {path.suffix!r}", names_hint())
    if os.sep in data or (os.altsep and os.altsep in data) or path.suffix:
        raise FtdoctorError(f"data not found: {path}", "check the path, or " + names_hint())
    raise FtdoctorError(f"unknown data {data!r}", names_hint())


def input_paths(data: str | None, data_root: str | None = None) -> list[Path]:
    """The files or directories ``--data`` reads (none for the built-in sets): no output may land on them."""
    if not data:
        return []
    source = source_for(data.strip())
    return source.inputs(data.strip(), data_root) if source is not None else [Path(data).expanduser()]


class PathSource(DataSource):
    """A source that reads one file with one of ``suffixes`` (regular files only)."""

    def claims(self, data: str) -> bool:
        path = Path(data).expanduser()
        return path.suffix.lower() in self.suffixes and not path.is_dir()

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        path = Path(data).expanduser()
        if not os.path.exists(path):
            raise FtdoctorError(f"data file not found: {path}",
                                "check the path (relative paths start at the working directory)")
        from ftdoctor.safety import regular_file
        regular_file(path, "the data file")   # a FIFO or device: refused before it is opened
        return self.read(path, opts), data

    def read(self, path: Path, opts: Any) -> Any:
        raise NotImplementedError
