"""What ftdoctor does before it reads any file: everything it reads is untrusted (SPEC §8).

* :func:`regular_file` / :func:`open_regular` — only regular files are read: a
  FIFO, a device (``/dev/zero``, ``/dev/urandom``), a socket or a directory is
  refused at once, through symlinks too, before any byte is hashed or parsed
  (opening a FIFO for reading would block until a writer comes; reading a
  device never ends).
* :func:`load_data_pickle` — the pickle-based data formats (CIFAR's batch and
  meta files) are read by an unpickler that admits only what those formats
  need: containers, strings, numbers and numpy arrays. Any other global is
  refused, naming the file and the global, without importing or calling it.
* the limits (:data:`MAX_CLASSES`, :data:`MAX_IMAGE_PIXELS`, ...) bound what a
  small file may make ftdoctor allocate; the readers check a file's declared
  sizes against them *before* allocating.
"""
from __future__ import annotations

import codecs
import fcntl
import os
import pickle
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ftdoctor.errors import FtdoctorError

# -- limits ------------------------------------------------------------------------------------------
#: The most classes a dataset or head may have: one-hot labels, new heads and per-class sums are O(C).
MAX_CLASSES = 100_000
#: The most pixels (height × width) one stored or decoded image may have (8192 × 8192).
MAX_IMAGE_PIXELS = 8192 * 8192
#: The most memory one prepared float32 batch may take (batch size × C × H × W × 4 bytes).
MAX_BATCH_BYTES = 2 << 30
#: The most memory the capped images of an in-memory source (.npz) may take.
MAX_IN_MEMORY_BYTES = 2 << 30
#: The most memory a file's labels may take once read (they are read whole: class count, sampling).
MAX_LABEL_BYTES = 256 << 20
#: The most memory one compressed HDF5 chunk may take once decompressed (it is decompressed whole).
MAX_CHUNK_BYTES = 256 << 20
#: A config file larger than this is not a config file.
MAX_CONFIG_BYTES = 1 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: str | Path, mode: int, what: str) -> FtdoctorError:
    """The error for a path that exists but is not a regular file."""
    return FtdoctorError(f"{what} {path} is {_kind(mode)}, not a regular file",
                         "ftdoctor reads only regular files: pass a file (not a pipe, device or directory)")


def regular_file(path: str | Path, what: str = "the file") -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), or an :class:`FtdoctorError` unless it is a regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FtdoctorError(f"{what} {path} does not exist", "check the path") from None
    except OSError as exc:
        raise FtdoctorError(f"cannot read {what} {path}: {exc.strerror or exc}",
                            "check the path and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise not_regular(path, info.st_mode, what)
    return info


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` (links followed) is an existing regular file; never blocks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | Path, what: str = "the file") -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything but a regular file.

    The file is opened non-blocking (a FIFO opened for reading would wait for a
    writer) and checked with ``fstat`` on the open descriptor, so a path swapped
    after a check cannot smuggle a FIFO or device in.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FtdoctorError(f"{what} {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise FtdoctorError(f"{what} {path} is a directory, not a regular file", "pass a file") from None
    except OSError as exc:
        raise FtdoctorError(f"cannot read {what} {path}: {exc.strerror or exc}",
                            "check the path and its permissions") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode, what)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, limit: int, what: str = "the file") -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FtdoctorError(f"{what} {path} is larger than {human_bytes(limit)}",
                            "pass the right file (ftdoctor refuses files this large for this purpose)")
    return data


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_class_count(count: int, what: str) -> int:
    """A class count a file states or implies, bounded by :data:`MAX_CLASSES`."""
    if count > MAX_CLASSES:
        raise FtdoctorError(f"{what} implies {count:,} classes, more than ftdoctor handles ({MAX_CLASSES:,})",
                            "store labels as class indices 0 … C−1 with C at most "
                            f"{MAX_CLASSES:,} (a label this large is usually a corrupt or wrong file)")
    return count


def check_image_pixels(height: int, width: int, what: str) -> None:
    if height * width > MAX_IMAGE_PIXELS:
        raise FtdoctorError(f"{what} is {width}×{height} pixels, more than ftdoctor decodes "
                            f"({MAX_IMAGE_PIXELS:,} pixels)",
                            "downscale the images first (a small file declaring a huge image is a decompression bomb)")


def check_batch_bytes(batch_size: int, shape: tuple[int, ...], what: str, itemsize: int = 4) -> None:
    """One batch of ``shape``-sized items (float32, or ``itemsize`` bytes each as stored) must fit in
    :data:`MAX_BATCH_BYTES`."""
    size = batch_size * itemsize
    for s in shape:
        size *= int(s)
    if size > MAX_BATCH_BYTES:
        dims = "×".join(str(int(s)) for s in shape)
        raise FtdoctorError(f"a batch of {batch_size} {what} of {dims} would take {human_bytes(size)} "
                            f"(ftdoctor's limit is {human_bytes(MAX_BATCH_BYTES)})",
                            "pass --image-size (e.g. 224) to resize the images, or a smaller --batch-size")


# -- pickle-based data files --------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's array reconstructors under the module names of numpy 1 (``numpy.core``) and 2 (``numpy._core``)."""
    import importlib

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        for module, names in (("multiarray", ("_reconstruct", "scalar")), ("numeric", ("_frombuffer",))):
            try:
                # both names resolve to numpy's own module, whichever numpy is installed
                found = importlib.import_module(f"numpy._core.{module}")
            except ImportError:
                found = importlib.import_module(f"numpy.core.{module}")
            for name in names:
                if hasattr(found, name):
                    allowed[(f"{core}.{module}", name)] = getattr(found, name)
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: dicts, lists, tuples, str/bytes, numbers and numpy arrays only.

    ``find_class`` returns only numpy's array and dtype reconstructors (and
    ``_codecs.encode`` restricted to latin-1, which Python 3 uses for bytes in
    protocol-2 pickles); every other global raises :class:`RefusedGlobal`
    before it is imported. Persistent ids are refused.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if DataUnpickler._allowed is None:
            DataUnpickler._allowed = _numpy_globals()
        found = DataUnpickler._allowed.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a data file")


def _no_object_arrays(obj: Any, path: Path, depth: int = 0) -> None:
    if depth > 32:
        raise FtdoctorError(f"{path} nests containers more than 32 deep", "this is not a data file of the format")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise FtdoctorError(f"{path} holds an array of Python objects",
                                "data files must hold plain numeric arrays")
    elif isinstance(obj, dict):
        for v in obj.values():
            _no_object_arrays(v, path, depth + 1)
    elif isinstance(obj, (list, tuple)):
        if obj and not isinstance(obj[0], (int, float, str, bytes)):
            for v in obj:
                _no_object_arrays(v, path, depth + 1)


def load_data_pickle(path: str | Path, *, encoding: str = "latin1", remedy: str) -> Any:
    """Unpickle a pickle-based data file with :class:`DataUnpickler`.

    A refused global is an :class:`FtdoctorError` naming the file and the
    global (nothing was imported or run); a damaged pickle is one too.
    """
    path = Path(path)
    with open_regular(path, "the data file") as f:
        try:
            obj = DataUnpickler(f, encoding=encoding).load()
        except RefusedGlobal as exc:
            raise FtdoctorError(
                f"{path} is a pickle that asks for {exc.qualname}, which a data file never needs; "
                "it was not loaded (unpickling it could run arbitrary code)",
                "replace the file with a genuine copy of the dataset (or re-fetch it with --download)") from None
        except FtdoctorError:
            raise
        except Exception as exc:  # truncated, not a pickle, wrong structure
            raise FtdoctorError(f"{path} is incomplete or corrupted (not a readable data pickle: "
                                f"{type(exc).__name__}: {str(exc)[:160]})", remedy) from None
    _no_object_arrays(obj, path)
    return obj
