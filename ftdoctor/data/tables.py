"""Table files and ``datasets`` folders as ``--data``: text for sequence classifiers, image paths or bytes for
image models (columns chosen by :mod:`.columns`).

* ``.csv`` / ``.tsv`` (a header row; integer labels written as digits are read as integers),
  ``.jsonl`` (one JSON object per line), ``.parquet`` (read with pyarrow) — one split each;
* a folder written by ``datasets``' ``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` whose split
  ``--split`` names (``train``, ``test``, ``validation``, ...). A ``ClassLabel`` label column keeps its
  class names; an ``Image`` column is decoded by ftdoctor (size-checked), not by the library.

Files are read whole, up to :data:`~ftdoctor.safety.MAX_IN_MEMORY_BYTES`; nothing in them is run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ftdoctor.data.columns import table_split
from ftdoctor.data.sources import DataSource, PathSource, register_data_source
from ftdoctor.errors import FtdoctorError

_INTEGER = re.compile(r"^\s*-?\d+\s*$")


def _bounded(path: Path) -> None:
    from ftdoctor.safety import MAX_IN_MEMORY_BYTES, human_bytes

    size = os.stat(path).st_size
    if size > MAX_IN_MEMORY_BYTES:
        raise FtdoctorError(f"{path} is {human_bytes(size)}, more than ftdoctor reads into memory "
                            f"({human_bytes(MAX_IN_MEMORY_BYTES)})",
                            "pass a smaller file (the examples --max-samples keeps), or save it with "
                            "datasets' save_to_disk")


def _rows_to_columns(rows: list[dict[str, Any]], path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    names = list(seen)
    return names, {n: [row.get(n) for row in rows] for n in names}


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], dict[str, list[Any]]]:
    from ftdoctor.safety import open_regular

    try:
        with open_regular(path, "the data file") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(text, delimiter=delimiter)
            names = [n for n in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FtdoctorError(f"{path} is not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file: {exc}",
                            "save it as UTF-8 with a header row") from None
    if not names:
        raise FtdoctorError(f"{path} has no header row", "put the column names on the first line")
    columns = {n: [row.get(n) for row in rows] for n in names}
    for n, values in columns.items():       # integer labels are written as digits
        if values and all(isinstance(v, str) and _INTEGER.match(v) for v in values):
            columns[n] = [int(v) for v in values]
    return names, columns


def _read_jsonl(path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    from ftdoctor.safety import open_regular

    rows = []
    with open_regular(path, "the data file") as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8-sig")
        try:
            text = lines.read()
        except UnicodeDecodeError as exc:
            raise FtdoctorError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                "save it as UTF-8") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise FtdoctorError(f"{path}, line {number}: not JSON ({getattr(exc, 'msg', 'nested too deeply')})",
                                    "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise FtdoctorError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object",
                                    "write one JSON object per line, e.g. {\"text\": ..., \"label\": ...}")
            rows.append(row)
    return _rows_to_columns(rows, path)


def _read_parquet(path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FtdoctorError("reading parquet needs pyarrow, which is not installed",
                            "install it: pip install 'ftdoctor[hf]'") from None
    from ftdoctor.safety import MAX_IN_MEMORY_BYTES, human_bytes

    try:
        meta = pq.ParquetFile(str(path)).metadata      # sizes from the footer, before any page is inflated
        inflated = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception as exc:  # noqa: BLE001 - pyarrow's own error types
        raise FtdoctorError(f"{path} is not a readable parquet file: {type(exc).__name__}: {exc}",
                            "check that the file is complete") from None
    if inflated > MAX_IN_MEMORY_BYTES:
        raise FtdoctorError(f"{path} inflates to {human_bytes(inflated)}, more than ftdoctor reads into memory "
                            f"({human_bytes(MAX_IN_MEMORY_BYTES)})", "pass a smaller file")
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        schema = pq.read_schema(str(path))
        text_like = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                     or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        parquet = pq.ParquetFile(str(path), read_dictionary=text_like)   # repeated values stay encoded
        names = list(schema.names)
        columns: dict[str, list] = {n: [] for n in names}
        decoded = 0
        for batch in parquet.iter_batches(batch_size=256):
            for name, column in zip(batch.schema.names, batch.columns):
                if isinstance(column, pa.DictionaryArray) and name in text_like:
                    # what the rows take once decoded, counted before any row is: a bomb is refused here
                    decoded += int(pc.sum(pc.take(pc.binary_length(column.dictionary), column.indices)).as_py()
                                   or 0)
                else:
                    decoded += column.nbytes
                if decoded > MAX_IN_MEMORY_BYTES:
                    raise FtdoctorError(f"{path} decodes to more than ftdoctor reads into memory "
                                        f"({human_bytes(MAX_IN_MEMORY_BYTES)})", "pass a smaller file")
                columns[name].extend(column.to_pylist())
    except FtdoctorError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's own error types
        raise FtdoctorError(f"{path} is not a readable parquet file: {type(exc).__name__}: {exc}",
                            "check that the file is complete") from None
    return names, columns


@register_data_source(name="table", priority=50, suffixes=(".csv", ".tsv", ".jsonl", ".parquet"))
class TableData(PathSource):
    """A CSV, TSV, JSONL or parquet file of texts (or image paths) and labels."""

    def read(self, path: Path, opts: Any) -> Any:
        if opts.split != "train":
            raise FtdoctorError(f"{path} holds one split; --split {opts.split} names another",
                                "pass that split's own file as --data (with --split train)")
        _bounded(path)
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            names, columns = _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".jsonl":
            names, columns = _read_jsonl(path)
        else:
            names, columns = _read_parquet(path)
        if not columns or not any(columns.values()):
            raise FtdoctorError(f"{path} has no rows", "point --data at a file with examples")
        notes: list[str] = []
        split = table_split(columns.__getitem__, names, opts, path.name, path.parent, notes)
        split.notes = notes
        if opts.subset == "first" and opts.max_samples is not None:
            import numpy as np
            split = split.select(np.arange(min(opts.max_samples, len(split.labels))))
            split.notes = notes
        return split


def _only_regular_files(folder: Path) -> None:
    """Every entry of a datasets folder is a regular file or a folder (a FIFO would hang the arrow reader)."""
    from ftdoctor.safety import not_regular

    for root, dirs, files in os.walk(folder):
        for name in files:
            entry = Path(root) / name
            try:
                mode = os.stat(entry).st_mode
            except OSError:
                raise FtdoctorError(f"{entry} is a broken link", "repair the datasets folder") from None
            import stat

            if not stat.S_ISREG(mode):
                raise not_regular(entry, mode, "the datasets file")


def is_datasets_folder(path: Path) -> bool:
    """A folder ``datasets``' ``save_to_disk`` wrote: a ``DatasetDict`` or a single ``Dataset``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or
                              ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


@register_data_source(name="datasets", priority=35, suffixes=())
class DatasetsFolder(DataSource):
    """A Hugging Face ``datasets`` folder (``save_to_disk``); ``--split`` picks a ``DatasetDict``'s split."""

    names = ("a datasets save_to_disk folder",)
    any_split = True

    def claims(self, data: str) -> bool:
        return is_datasets_folder(Path(data).expanduser())

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        path = Path(data).expanduser()
        try:
            import datasets
        except ImportError:
            raise FtdoctorError(f"{path} is a datasets folder, and reading it needs the datasets package",
                                "install it: pip install 'ftdoctor[hf]'") from None
        _only_regular_files(path)
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - whatever the library raises on a damaged folder
            raise FtdoctorError(f"{path} is not a readable datasets folder: {type(exc).__name__}: {exc}",
                                "write it again with save_to_disk") from None
        name = data
        if isinstance(loaded, datasets.DatasetDict):
            if opts.split not in loaded:
                raise FtdoctorError(f"{path} has no {opts.split} split (it has {', '.join(loaded)})",
                                    f"use --split {' or '.join(loaded)}")
            ds = loaded[opts.split]
        elif opts.split != "train":
            raise FtdoctorError(f"{path} holds one Dataset, not a DatasetDict with a {opts.split} split",
                                "use --split train")
        else:
            ds = loaded
        if opts.subset == "first" and opts.max_samples is not None:
            ds = ds.select(range(min(opts.max_samples, len(ds))))
        if len(ds) == 0:
            raise FtdoctorError(f"{path} has no rows in its {opts.split} split", "point --data at examples")
        class_names = {}
        for column, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                class_names[column] = list(feature.names)
            elif isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))   # ftdoctor decodes, size-checked
        notes: list[str] = []
        split = table_split(lambda c: ds[c], list(ds.column_names), opts, path.name, path, notes, class_names)
        split.notes = notes
        return split, name

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        return [Path(data).expanduser()]
