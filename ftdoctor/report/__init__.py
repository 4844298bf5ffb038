"""Output formats, one module each, behind one interface looked up by name (:mod:`.formats`): rich ``table``,
``json``, ``markdown``, ``hdf5``, and for ``check`` its ``text`` table, ``junit``, ``github`` and ``sarif``; ``plot`` draws
pictures of HDF5 files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ftdoctor.report.formats import FORMATS, OutputFormat, get, names, register_format


def load_formats() -> None:
    """Import the format modules (each registers itself); cheap to call again."""
    from ftdoctor.report import check_text, github, hdf5, html, json, junit, markdown, sarif, table  # noqa: F401


def write_files(result: Any, files: Iterable[tuple[str, Any]]) -> None:
    """Write ``result`` (a report with a ``kind``) in each format named in ``files`` whose path is not None,
    in order — the files a command's ``--output``/``--hdf5``/``--html`` ask for."""
    load_formats()
    for name, path in files:
        if path is not None:
            get(name, result.kind).write(result, Path(path))


__all__ = ["FORMATS", "OutputFormat", "get", "load_formats", "names", "register_format", "write_files"]
