"""Output formats, one module each, behind one interface looked up by name (:mod:`.formats`): rich ``table``,
``json``, ``markdown``, ``hdf5``, and for ``check`` its ``text`` table, ``junit`` and ``github``; ``plot`` draws
pictures of HDF5 files."""
from __future__ import annotations

from ftdoctor.report.formats import FORMATS, OutputFormat, get, names, register_format


def load_formats() -> None:
    """Import the format modules (each registers itself); cheap to call again."""
    from ftdoctor.report import check_text, github, hdf5, html, json, junit, markdown, table  # noqa: F401


__all__ = ["FORMATS", "OutputFormat", "get", "load_formats", "names", "register_format"]
