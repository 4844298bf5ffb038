"""HDF5 files read as untrusted input: only what lives inside the file, sizes checked first (SPEC §8).

An HDF5 dataset need not hold its data: *external storage* points at raw
bytes in other files (``/dev/zero``, a FIFO, the user's private files), a
*virtual dataset* maps other files' datasets, an *external link* names an
object in another file, and a filter may be a plugin library loaded from disk.
:func:`checked_dataset` refuses all four, object and complex dtypes, and
chunks too large to decompress, before a byte of data is read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import MAX_CHUNK_BYTES, human_bytes, open_regular, regular_file

# Filters HDF5 and h5py have built in: deflate, shuffle, fletcher32, szip, nbit, scaleoffset, lzf.
BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})


def open_file(path: Path, what: str, remedy: str) -> Any:
    """``h5py.File(path, "r")`` for a regular file, without HDF5's file locking."""
    import h5py

    regular_file(path, what)
    open_regular(path, what).close()   # a FIFO swapped in after the check is refused, not waited on
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        raise FtdoctorError(f"cannot read {path} as HDF5: not an HDF5 file, or a damaged one ({exc})",
                            remedy) from None


def listing(handle: Any, path: Path, remedy: str) -> tuple[list[str], set[str]]:
    """The names of the file's datasets (anywhere) and of its top-level links; a damaged tree is an error."""
    import h5py

    def text(name: Any) -> str:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    found: list[str] = []
    try:
        handle.visititems(lambda name, obj: found.append(text(name)) if isinstance(obj, h5py.Dataset) else None)
        links = {text(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - a damaged B-tree or object header
        raise FtdoctorError(f"cannot read the contents of {path}: {exc}", remedy) from None
    return found, links


def checked_dataset(handle: Any, key: str, what: str, *, numeric: bool = True) -> Any:
    """The dataset ``key`` of an open file, refused unless its data lives in the file and is safe to read."""
    import h5py

    link = handle.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise FtdoctorError(f"{what} is an external link to {link.filename}:{link.path}",
                            "store the data in the file itself (ftdoctor does not follow links to other files)")
    obj = handle.get(key)
    if not isinstance(obj, h5py.Dataset):
        raise FtdoctorError(f"{what} is not a dataset", "store it as an HDF5 dataset")
    if obj.is_virtual:
        raise FtdoctorError(f"{what} is a virtual dataset (its data lives in other files)",
                            "store the data in the file itself")
    if obj.external:
        raise FtdoctorError(f"{what} uses external storage ({obj.external[0][0]!s}, ...)",
                            "store the data in the file itself (ftdoctor does not read other files)")
    plist = obj.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in BUILTIN_FILTERS:
            raise FtdoctorError(f"{what} needs the HDF5 filter plugin {code}",
                                "store it uncompressed or with gzip/lzf compression")
    dtype = obj.dtype
    if dtype.hasobject or dtype.kind in ("O", "V", "S", "U") and numeric:
        raise FtdoctorError(f"{what} has dtype {dtype}, not numbers", "store numeric arrays")
    if np.issubdtype(dtype, np.complexfloating):
        raise FtdoctorError(f"{what} holds complex numbers ({dtype})", "store real-valued arrays")
    if obj.chunks is not None:
        chunk_bytes = math.prod(obj.chunks) * dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise FtdoctorError(f"{what} is stored in chunks of {human_bytes(chunk_bytes)}, each decompressed "
                                f"whole to read any of it (ftdoctor's limit is {human_bytes(MAX_CHUNK_BYTES)})",
                                "rewrite it with smaller chunks (h5py picks sensible ones with chunks=True)")
    declared = math.prod(obj.shape or ()) * dtype.itemsize
    stored = obj.id.get_storage_size()
    if declared and stored == 0:
        raise FtdoctorError(f"{what} declares {human_bytes(declared)} but holds no data (never written)",
                            "write the data into the dataset")
    if obj.chunks is None and obj.compression is None and stored < declared:
        raise FtdoctorError(f"{what} declares {human_bytes(declared)} but holds {human_bytes(stored)}",
                            "the file is damaged or truncated; write it again")
    return obj


def read_whole(dataset: Any, what: str, limit: int) -> np.ndarray:
    """All of a (checked) dataset, if it declares at most ``limit`` bytes."""
    nbytes = math.prod(dataset.shape or ()) * dataset.dtype.itemsize
    if nbytes > limit:
        raise FtdoctorError(f"{what} declares {human_bytes(nbytes)}, more than ftdoctor reads for it "
                            f"({human_bytes(limit)})", "store a smaller array")
    return np.asarray(dataset[()])
