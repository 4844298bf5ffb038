"""HDF5 report files (SPEC §3): root attributes ``schema`` and ``report`` (the JSON text), arrays below."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from ftdoctor.outputs import atomic_write
from ftdoctor.report.formats import OutputFormat, register_format
from ftdoctor.report.json import dumps


def write(path: str | Path, schema: str, report: dict[str, Any], arrays: Mapping[str, np.ndarray],
          attrs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write ``arrays`` (keyed by HDF5 path) with the report JSON as a root attribute, atomically."""
    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = schema
            f.attrs["report"] = dumps(report)
            for key, arr in arrays.items():
                f.create_dataset(key, data=np.asarray(arr))
            for key, kv in (attrs or {}).items():
                for k, v in kv.items():
                    f[key].attrs[k] = v
    atomic_write(Path(path), _write)


@register_format
class Hdf5Format(OutputFormat):
    """The report and its arrays (G², per-batch norms, per-channel R², the runs' series) in one HDF5 file."""

    name = "hdf5"
    kinds = frozenset({"probe", "trace", "compare"})
    file_only = True

    def write(self, result: Any, path: Path) -> None:
        doc = result.to_json()
        attrs = result.attrs() if hasattr(result, "attrs") else None
        write(path, doc["schema"] if result.kind == "probe" else "ftdoctor.trace/1", doc, result.arrays(), attrs)
