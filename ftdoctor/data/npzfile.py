"""Bounded reading of ``.npz`` archives: each array's header first, then only the rows needed (SPEC §8).

``numpy.load`` decompresses a whole member to read any of it, so a 3 MB
archive of compressed zeros can demand gigabytes even when ``--max-samples 8``
needs eight rows. :class:`NpzArchive` reads a member's ``.npy`` header (shape,
dtype, order) without its data, refuses object and complex arrays, and reads
the first ``n`` rows of a C-ordered array by decompressing only their bytes.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import human_bytes, open_regular

_REMEDY = "write it with numpy.savez(path, x=images, y=labels) (numeric arrays, no objects)"
# A Fortran-ordered array is read whole (its first rows are not contiguous): only up to this size.
MAX_WHOLE_BYTES = 256 << 20


@dataclass(frozen=True)
class Header:
    """What a member's ``.npy`` header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape[1:]:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.row_bytes * (int(self.shape[0]) if self.shape else 1)


class NpzArchive:
    """An ``.npz`` file opened for bounded reads; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open_regular(path, "the data file")
        try:
            self._zip = zipfile.ZipFile(self._file)
        except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError (zip version), ...
            self._file.seek(0)
            magic = self._file.read(6)
            self._file.close()
            if magic == b"\x93NUMPY":
                raise FtdoctorError(f"{path} is a single .npy array, not an .npz archive", _REMEDY) from None
            raise FtdoctorError(f"cannot read {path} as .npz: {exc}", _REMEDY) from None
        self.files = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def _open(self, name: str) -> BinaryIO:
        return self._zip.open(name + ".npy")  # type: ignore[return-value]

    def header(self, name: str) -> Header:
        """The declared shape, dtype and order of member ``name`` (no data read)."""
        try:
            with self._open(name) as f:
                return _read_header(f, f"{self.path}:{name}")
        except FtdoctorError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged member
            raise FtdoctorError(f"cannot read the array {name!r} of {self.path}: {exc}", _REMEDY) from None

    def read(self, name: str, rows: int | None = None, *, limit: int | None = None,
             at: np.ndarray | None = None) -> np.ndarray:
        """Member ``name``, or only its first ``rows`` rows, or only the rows ``at`` (ascending: streamed, so
        only those rows are held); more than ``limit`` bytes is refused."""
        what = f"{self.path}:{name}"
        try:
            with self._open(name) as f:
                head = _read_header(f, what)
                count = int(head.shape[0]) if head.shape else 1
                if at is not None and head.shape and not head.fortran:
                    return _read_rows(f, head, count, np.asarray(at, dtype=np.int64), limit, what)
                take = count if rows is None or not head.shape else min(rows, count)
                wanted = head.row_bytes * take
                held = self._zip.getinfo(name + ".npy").file_size - f.tell()
                if head.nbytes > held:
                    raise FtdoctorError(f"{what} declares {human_bytes(head.nbytes)} of data but holds "
                                        f"{human_bytes(max(0, held))}", "the file is damaged; write it again")
                if limit is not None and wanted > limit:
                    raise FtdoctorError(f"{what} declares {human_bytes(wanted)} to read, more than ftdoctor "
                                        f"reads for it ({human_bytes(limit)})",
                                        "pass --subset first with a --max-samples that fits (only those "
                                        "first rows are then read), or store a smaller array")
                if head.fortran and take < count:
                    if head.nbytes > MAX_WHOLE_BYTES:
                        raise FtdoctorError(f"{what} is stored in Fortran order and declares "
                                            f"{human_bytes(head.nbytes)}: its first rows cannot be read alone",
                                            "save it in C order (numpy's default) with numpy.savez")
                    return np.ascontiguousarray(_from_bytes(_read_exact(f, head.nbytes, what), head, count)[:take])
                return _from_bytes(_read_exact(f, wanted, what), head, take)
        except FtdoctorError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged member (bad CRC, truncated deflate stream)
            raise FtdoctorError(f"cannot read the array {name!r} of {self.path}: {exc}", _REMEDY) from None


_CHUNK_BYTES = 16 << 20


def _read_rows(f: BinaryIO, head: Header, count: int, at: np.ndarray, limit: int | None, what: str) -> np.ndarray:
    """Rows ``at`` (ascending) of a C-order array, streamed in chunks of ~16 MB: memory is the rows kept."""
    if at.size and (at.min() < 0 or at.max() >= count):
        raise FtdoctorError(f"{what}: row index out of range", _REMEDY)
    wanted = head.row_bytes * int(at.size)
    if limit is not None and wanted > limit:
        raise FtdoctorError(f"{what} declares {human_bytes(wanted)} to read, more than ftdoctor reads for it "
                            f"({human_bytes(limit)})", "pass a smaller --max-samples, or store a smaller array")
    per_chunk = max(1, _CHUNK_BYTES // max(1, head.row_bytes))
    parts, done = [], 0
    last = int(at[-1]) + 1 if at.size else 0
    while done < last:
        n = min(per_chunk, last - done)
        block = _from_bytes(_read_exact(f, head.row_bytes * n, what), head, n)
        lo, hi = np.searchsorted(at, [done, done + n])
        if hi > lo:
            parts.append(np.array(block[at[lo:hi] - done]))
        done += n
    if parts:
        return np.concatenate(parts)
    return _from_bytes(bytearray(), head, 0)


def _read_header(f: BinaryIO, what: str) -> Header:
    import ast

    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy.read_array_header_2_0(f)
    elif version == (3, 0):    # 2.0 with a utf-8 header (numpy writes it for non-latin-1 field names)
        size = int.from_bytes(f.read(4), "little")
        if size > 100_000:
            raise FtdoctorError(f"{what} has a {size}-byte array header", _REMEDY)
        fields = ast.literal_eval(f.read(size).decode("utf-8"))
        shape, fortran = fields["shape"], fields["fortran_order"]
        dtype = npy.descr_to_dtype(fields["descr"])
    else:
        raise FtdoctorError(f"{what} is in .npy format {version}, which ftdoctor does not read", _REMEDY)
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FtdoctorError(f"{what} is an array of Python objects", _REMEDY)
    if np.issubdtype(dtype, np.complexfloating):
        raise FtdoctorError(f"{what} holds complex numbers ({dtype})", "store real-valued images and labels")
    if not isinstance(shape, tuple) or any(not isinstance(s, int) or s < 0 for s in shape):
        raise FtdoctorError(f"{what} declares an invalid shape {shape!r}", _REMEDY)
    return Header(tuple(int(s) for s in shape), dtype, bool(fortran))


def _read_exact(f: BinaryIO, n: int, what: str, block: int = 16 << 20) -> bytearray:
    """``n`` bytes, read block by block: memory follows the data actually there, not what a header claims."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(block, n - len(buf)))
        if not chunk:
            raise FtdoctorError(f"{what} ends early: {len(buf)} of {n} bytes", "the file is truncated; write it again")
        buf += chunk
    return buf


def _from_bytes(data: bytearray, head: Header, rows: int) -> np.ndarray:
    flat = np.frombuffer(data, dtype=head.dtype)   # writable: it views the bytearray
    if not head.shape:
        return flat.reshape(())
    shape = (rows, *head.shape[1:])
    if head.fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)
