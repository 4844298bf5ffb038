"""Property-based fuzzing of ftdoctor's file readers: every file is untrusted (SPEC §8).

Valid tiny files of each format (torch.save zip and legacy, safetensors, .npz
stored and deflated, HDF5 contiguous and chunked/gzip) are mutated: byte flips,
truncation, inserted/deleted runs, integers written over container fields (zip
headers and directory, the safetensors header length, pickle integer operands,
HDF5 metadata), and structure-aware rewrites (the safetensors JSON header, the
``.npy`` header of an ``.npz`` member, a member of a zip rebuilt with a valid
CRC). For every mutant the reader must

1. succeed or raise :class:`FtdoctorError` (any subclass) and nothing else;
2. run no code from the file (malicious-pickle files are fuzzed too: a canary
   file must never appear, and an audit hook sees no write/exec/spawn);
3. finish in bounded time (hypothesis ``deadline``; a watchdog for hangs);
4. not grow the peak RSS by 1 GiB or more (VmHWM, reset through
   ``/proc/self/clear_refs``). The call runs under an address-space cap that keeps
   a real bomb off the machine; when it meets a ``MemoryError`` it is re-run
   uncapped in a forked child that is killed once its RSS grows by 1 GiB, which
   tells a harmless reservation (``read(n)`` with a huge ``n``) from a bomb;
5. leave the input file byte-identical.

The ``test_regression_*`` cases at the end are the bugs this fuzzing found
(each fixed), kept as single reproducers.

``FTD_FUZZ_EXAMPLES=N`` and ``FTD_FUZZ_RANDOM=1`` widen a local bug hunt; the
default run is deterministic (``derandomize=True``).
"""
from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import pickletools
import resource
import signal
import sys
import textwrap
import time
import traceback
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings, strategies as st
from hypothesis.control import currently_in_test_context

import ftdoctor
from ftdoctor.checkpoint import ModelOptions, load_model
from ftdoctor.data import DataOptions, load_data
from ftdoctor.errors import FtdoctorError

h5py = pytest.importorskip("h5py")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak-RSS accounting needs /proc"),
    # pickletools.genops (ftdoctor's opcode scanners) warns on a mutated STRING opcode: noise, not a finding
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]

EXAMPLES = int(os.environ.get("FTD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,
    derandomize=not os.environ.get("FTD_FUZZ_RANDOM"),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)

NETS_MODULE = "ftd_fuzz_nets"
ARCH = f"{NETS_MODULE}:SmallCNN"
EVIL_MODULE = "ftd_fuzz_evil"
GB = 1 << 30
RSS_LIMIT = 1 * GB            # invariant 4: peak RSS growth per call
AS_HEADROOM = 3 * GB          # address-space cap during a call (keeps a real bomb off the machine)
HANG_SECONDS = 30             # watchdog beyond the hypothesis deadline (a call that never returns)
FTDOCTOR_DIR = os.path.dirname(os.path.abspath(ftdoctor.__file__))

NETS_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self, num_classes=10, in_ch=3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_ch, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.features(x))
''')


# --------------------------------------------------------------------------- "no code runs" canaries

CANARY_DIR: Path | None = None   # set by the module fixture: a directory that must stay empty


def canary_path() -> str:
    assert CANARY_DIR is not None
    return str(CANARY_DIR / "PWNED")


class Evil:
    """Unpickled with full pickle, this creates the canary file."""

    def __reduce__(self):
        return (open, (canary_path(), "w"))


class EvilImport:
    """Unpickled with full pickle, this imports a module (next to the arch module, on sys.path) that creates the canary."""

    def __reduce__(self):
        import importlib

        return (getattr(importlib.import_module(EVIL_MODULE), "boom"), ())


_AUDIT = {"on": False, "events": []}
_SUSPICIOUS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
               "pty.spawn", "os.remove", "os.unlink", "os.rename", "os.rmdir", "shutil.rmtree", "os.chmod",
               "os.truncate", "socket.connect", "urllib.Request", "webbrowser.open")

_INSTALLED = tuple({os.path.abspath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def _audit(name: str, args: tuple) -> None:
    if not _AUDIT["on"]:
        return
    if name == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            _AUDIT["events"].append((name, repr(path), mode))
        elif mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            _AUDIT["events"].append((name, repr(path), flags))
    elif name == "ctypes.dlopen":   # torchvision loading its own extensions is fine; a library named by a file is not
        lib = os.path.abspath(str(args[0])) if args and args[0] else ""
        if not lib.startswith(_INSTALLED):
            _AUDIT["events"].append((name, lib))
    elif name.startswith(_SUSPICIOUS):
        _AUDIT["events"].append((name, repr(args)[:200]))
    elif name == "import" and args and isinstance(args[0], str) and args[0].split(".")[0] == EVIL_MODULE:
        _AUDIT["events"].append((name, args[0]))


sys.addaudithook(_audit)   # cannot be removed; inert unless a fuzzed call is running


# --------------------------------------------------------------------------- invariants around one call

def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field_name} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` in the library swallows it."""


@contextlib.contextmanager
def _watchdog(seconds: int):
    def fire(signum, frame):
        raise Hang(f"the call did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _address_space_cap(headroom: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("VmSize") + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _escape_site(exc: BaseException) -> tuple[str, str, int, str] | None:
    """(ftdoctor file, function, line, source) of the deepest ftdoctor frame the exception passed through."""
    site = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(FTDOCTOR_DIR + os.sep):
            site = (os.path.relpath(filename, os.path.dirname(FTDOCTOR_DIR)), frame.f_code.co_name, lineno,
                    linecache.getline(filename, lineno).strip())
    return site


def _pid_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_uncapped_in_child(call: Callable[[], object]) -> dict:
    """Run ``call`` in a forked child without the address-space cap; kill it past the RSS bound or on a hang.

    Used only when the capped call met a ``MemoryError``: was that a harmless reservation (``read(n)`` with a
    huge ``n``, never touched) or an allocation that would really have been filled?
    """
    parent_rss = _status("VmRSS")
    r, w = os.pipe()
    with warnings.catch_warnings():   # Python >= 3.12 warns about fork() in a process with threads (torch's)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:   # the child: report through the pipe, never return into pytest
        try:
            os.close(r)
            _reset_peak_rss()
            base = _status("VmRSS")
            try:
                call()
                outcome = "loaded"
            except FtdoctorError:
                outcome = "FtdoctorError"
            except BaseException as exc:  # noqa: BLE001
                outcome = f"{type(exc).__name__} from {_escape_site(exc)}: {exc}"[:400]
            os.write(w, json.dumps({"outcome": outcome, "growth": _status("VmHWM") - base}).encode())
        finally:
            os._exit(0)
    os.close(w)
    killed = None
    deadline = time.monotonic() + HANG_SECONDS
    while True:
        done, _status_code = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if _pid_rss(pid) - parent_rss >= RSS_LIMIT:
            killed = f"killed: its RSS grew by more than {RSS_LIMIT >> 20} MiB"
        elif time.monotonic() > deadline:
            killed = f"killed: no result after {HANG_SECONDS} s"
        if killed:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    with os.fdopen(r, "rb") as f:
        text = f.read()
    result = json.loads(text) if text else {"outcome": killed or "the child died", "growth": None}
    result["killed"] = killed
    return result


def check_invariants(fmt: str, path: Path, call: Callable[[], object]) -> str:
    """Run ``call`` on the mutant at ``path`` and assert invariants 1-5; return the outcome (for statistics)."""
    assert CANARY_DIR is not None and not any(CANARY_DIR.iterdir())
    before = path.read_bytes()
    _AUDIT["events"].clear()
    _reset_peak_rss()                          # VmHWM := the current RSS
    base = _status("VmRSS")
    error: Exception | None = None
    try:
        with _watchdog(HANG_SECONDS), _address_space_cap(AS_HEADROOM):
            _AUDIT["on"] = True
            try:
                call()
            finally:
                _AUDIT["on"] = False
    except Exception as exc:  # noqa: BLE001 - judged below
        error = exc
    growth = _status("VmHWM") - base
    events = list(_AUDIT["events"])

    # invariant 2: no code from the file ran (nothing written, spawned or imported; no canary)
    assert not events, f"{fmt}: the call wrote, spawned or imported something: {events}"
    assert not any(CANARY_DIR.iterdir()), f"{fmt}: code from the file ran: {sorted(CANARY_DIR.iterdir())}"
    # invariant 5: the input is untouched
    assert path.read_bytes() == before, f"{fmt}: the input file was modified"

    outcome = "loaded" if error is None else type(error).__name__
    memory_problem = None
    if growth >= RSS_LIMIT:                   # invariant 4
        memory_problem = f"peak RSS grew by {growth >> 20} MiB"
    elif error is not None and any(isinstance(e, MemoryError) for e in _chain(error)):
        # The cap turned an allocation into MemoryError: decide without it whether that allocation was a bomb.
        child = _run_uncapped_in_child(call)
        if child["killed"] or child["growth"] is None or child["growth"] >= RSS_LIMIT:
            memory_problem = (f"an allocation failed only because of the test's {AS_HEADROOM >> 30} GiB "
                              f"address-space cap ({error!r}); uncapped: {child}")
        elif not isinstance(error, FtdoctorError) and child["outcome"] in ("loaded", "FtdoctorError"):
            outcome, error = child["outcome"] + " (uncapped)", None   # the escape was an artefact of the cap
        if currently_in_test_context():
            note(f"uncapped re-run: {child}")

    if memory_problem is not None:
        raise AssertionError(f"{fmt}: memory bound broken: {memory_problem}; outcome {outcome}: {error}") from error
    if error is not None and not isinstance(error, FtdoctorError):   # invariant 1
        error.add_note(f"ftdoctor fuzz ({fmt}): {type(error).__name__} escaped from {_escape_site(error)}; "
                       "only FtdoctorError may")
        raise error
    if currently_in_test_context():
        note(f"outcome={outcome}; peak RSS growth {growth / 2**20:.1f} MiB")
        event(f"{fmt}: {outcome}")
    return outcome


# --------------------------------------------------------------------------- mutations

INTERESTING = (0, 1, 2, 3, 7, 8, 16, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 53, (1 << 62), (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1,
               0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000, 0x7F800000, 0x7FC00000,   # inf, nan
               0x7FEFFFFFFFFFFFFF, 0x47EFFFFFE0000000)                                             # float max
interesting_ints = st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1))
positions = st.integers(0, 1 << 16)


@dataclass(frozen=True)
class Field:
    """An integer field of the valid file (little-endian), overwritten by ``field`` mutations."""

    name: str
    offset: int
    width: int

    def __repr__(self) -> str:
        return f"{self.name}@{self.offset}/{self.width}"


@dataclass
class Base:
    """A valid file and what the mutators know of its structure."""

    name: str
    suffix: str
    raw: bytes
    fields: list[Field] = field(default_factory=list)
    hot: list[int] = field(default_factory=list)   # offsets worth hitting: HDF5 metadata, digits of headers
    zip_members: dict[str, bytes] = field(default_factory=dict)
    member_fields: dict[str, list[Field]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Base({self.name}{self.suffix}, {len(self.raw)} bytes)"

    def _repr_pretty_(self, p, cycle) -> None:   # hypothesis prints dataclasses field by field otherwise
        p.text(repr(self))


@dataclass
class Mutant:
    data: bytes = field(repr=False)
    recipe: list

    def __repr__(self) -> str:
        return f"Mutant({len(self.data)} bytes: {self.recipe!r})"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))


def byte_ops(fields: list[Field], hot: list[int]):
    ops = [
        st.tuples(st.just("flip"), positions, st.integers(1, 255)),
        st.tuples(st.just("truncate"), positions),
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), positions, st.integers(1, 256)),
        st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("int"), positions, st.sampled_from((1, 2, 4, 8)), interesting_ints),
    ]
    if fields:
        some_field = st.integers(0, len(fields) - 1).map(fields.__getitem__)
        ops.append(st.tuples(st.just("field"), some_field, interesting_ints))
        ops.append(st.tuples(st.just("field"), some_field, interesting_ints))
    if hot:
        some_offset = st.integers(0, len(hot) - 1).map(hot.__getitem__)
        ops.append(st.tuples(st.just("hotflip"), some_offset, st.integers(1, 255)))
        ops.append(st.tuples(st.just("hotint"), some_offset, st.sampled_from((1, 2, 4, 8)), interesting_ints))
    return st.one_of(*ops)


def apply_ops(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind in ("flip", "hotflip"):
            if buf:
                pos = op[1] % len(buf)
                buf[pos] ^= op[2]
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1):]
        elif kind == "insert":
            pos = op[1] % (len(buf) + 1)
            buf[pos:pos] = op[2]
        elif kind == "delete":
            pos = op[1] % (len(buf) + 1)
            del buf[pos:pos + op[2]]
        elif kind == "overwrite":
            pos = op[1] % (len(buf) + 1)
            buf[pos:pos + len(op[2])] = op[2]
        elif kind in ("int", "hotint"):
            pos, width, value = op[1] % (len(buf) + 1), op[2], op[3]
            buf[pos:pos + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == "field":
            f, value = op[1], op[2]
            if f.offset + f.width <= len(buf):
                buf[f.offset:f.offset + f.width] = (value & ((1 << 8 * f.width) - 1)).to_bytes(f.width, "little")
        else:  # pragma: no cover
            raise AssertionError(kind)
    return bytes(buf)


def zip_fields(raw: bytes, offset: int = 0) -> list[Field]:
    """The integer fields of every local header, central-directory entry and the end record of a zip."""
    fields: list[Field] = []
    local = (("version", 4, 2), ("method", 8, 2), ("flags", 6, 2), ("crc", 14, 4), ("csize", 18, 4), ("usize", 22, 4),
             ("namelen", 26, 2), ("extralen", 28, 2))
    central = (("made_by", 4, 2), ("version", 6, 2), ("method", 10, 2), ("flags", 8, 2), ("crc", 16, 4), ("csize", 20, 4), ("usize", 24, 4),
               ("namelen", 28, 2), ("extralen", 30, 2), ("commentlen", 32, 2), ("disk", 34, 2),
               ("extattr", 38, 4), ("localoffset", 42, 4))
    end = (("disk", 4, 2), ("cddisk", 6, 2), ("entries_here", 8, 2), ("entries", 10, 2), ("cdsize", 12, 4),
           ("cdoffset", 16, 4), ("commentlen", 20, 2))
    for sig, layout, tag in ((b"PK\x03\x04", local, "lfh"), (b"PK\x01\x02", central, "cd"),
                             (b"PK\x05\x06", end, "eocd")):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            fields += [Field(f"{tag}{i}.{name}", offset + i + at, width) for name, at, width in layout]
            start = i + 4
    return fields


def pickle_fields(data: bytes, offset: int = 0, max_pickles: int = 6) -> list[Field]:
    """Integer operands (and string lengths) of the pickle opcodes at the start of ``data``."""
    widths = {"BININT1": 1, "BININT2": 2, "BININT": 4, "BINPUT": 1, "LONG_BINPUT": 4, "BINGET": 1,
              "LONG_BINGET": 4, "SHORT_BINUNICODE": 1, "BINUNICODE": 4, "SHORT_BINSTRING": 1, "BINSTRING": 4,
              "SHORT_BINBYTES": 1, "BINBYTES": 4, "FRAME": 8, "PROTO": 1}
    fields: list[Field] = []
    f = io.BytesIO(data)
    for _ in range(max_pickles):
        try:
            for op, _arg, pos in pickletools.genops(f):
                if op.name in widths:
                    fields.append(Field(f"pkl.{op.name}", offset + pos + 1, widths[op.name]))
                elif op.name == "LONG1":
                    fields.append(Field("pkl.LONG1", offset + pos + 2, data[pos + 1]))
        except Exception:
            break
    return fields


def rebuild_zip(members: dict[str, bytes], compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, content in members.items():
            z.writestr(name, content)
    return out.getvalue()


@st.composite
def member_rewrite(draw, base: Base):
    """A zip whose one member was mutated, rebuilt with valid CRCs and sizes (the damage reaches the parser)."""
    members = dict(base.zip_members)
    name = draw(st.sampled_from(sorted(members)))
    ops = draw(st.lists(byte_ops(base.member_fields.get(name, []), []), min_size=1, max_size=3))
    members[name] = apply_ops(members[name], ops)
    method = draw(st.sampled_from(((zipfile.ZIP_STORED, "stored"), (zipfile.ZIP_DEFLATED, "deflated"))))
    return rebuild_zip(members, method[0]), [("member", name, ops, method[1])]


NPY_DESCRS = ("|u1", "<i8", "<f4", ">f8", "|b1", "<f2", "<f16", "<c16", "|O", "|V8", "<U4", "|S3", "<M8[s]",
              "<m8[s]", "<u2", ">i4", "bogus", "", "[('a', '<i4')]", "<i8,<i8")
npy_dims = st.one_of(st.sampled_from((0, 1, 3, 8, 16, 8192, 65536, 2**31, 2**40, 2**63, 2**64, -1, -16)),
                     st.integers(-2, 64))


def npy_member(version: tuple[int, int], header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    """Build a ``.npy`` member: magic, version, header length (``length`` overrides the true one), header, data."""
    width = 2 if version[0] == 1 else 4
    pad = (-(6 + 2 + width + len(header_text) + 1)) % 64
    text = header_text + b" " * pad + b"\n"
    size = len(text) if length is None else length & ((1 << 8 * width) - 1)
    return b"\x93NUMPY" + bytes(version) + size.to_bytes(width, "little") + text + data


def split_npy(member: bytes) -> tuple[dict, bytes]:
    from numpy.lib import format as npy

    f = io.BytesIO(member)
    version = npy.read_magic(f)
    reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = reader(f, max_header_size=1 << 20)
    return {"descr": npy.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape}, member[f.tell():]


@st.composite
def npy_header_rewrite(draw, base: Base):
    """An .npz whose member's .npy header declares another shape, dtype, order, version or length."""
    members = dict(base.zip_members)
    name = draw(st.sampled_from(sorted(members)))
    header, data = split_npy(members[name])
    recipe = []
    if draw(st.integers(0, 4)) == 0:
        text = draw(st.one_of(st.binary(max_size=80),
                              st.sampled_from((b"{'descr': '|u1', 'fortran_order': False, 'shape': (16, 8, 8, 3)",
                                               b"{'descr': '|u1', 'shape': (16, 8, 8, 3), }", b"[1, 2, 3]",
                                               b"{'descr': '|u1', 'fortran_order': False, 'shape': (16, 8, 8, 3), "
                                               b"'extra': __import__('os')}",
                                               b"{'descr': '|u1', 'fortran_order': False, 'shape': (1e300,), }",
                                               b"{'descr': '|u1', 'fortran_order': False, 'shape': " + b"(" * 200
                                               + b")" * 200 + b"}"))))
        recipe.append(("npy_text", text))
    else:
        header = dict(header)
        for key in draw(st.lists(st.sampled_from(("descr", "fortran_order", "shape")), min_size=1, max_size=3,
                                 unique=True)):
            if key == "descr":
                header["descr"] = draw(st.sampled_from(NPY_DESCRS))
            elif key == "fortran_order":
                header["fortran_order"] = draw(st.sampled_from((True, False, 1, "yes", None)))
            else:
                shape = list(header["shape"])
                how = draw(st.sampled_from(("one", "big", "any")))
                if how == "one" and shape:
                    shape[draw(st.integers(0, len(shape) - 1))] = draw(npy_dims)
                elif how == "big" and len(shape) == 4:   # same count, huge images: what may be read per row?
                    shape[1:3] = draw(st.lists(st.sampled_from((8192, 16384, 2**16, 2**20, 2**31)), min_size=2,
                                               max_size=2))
                else:
                    shape = draw(st.lists(npy_dims, max_size=6))
                header["shape"] = tuple(shape)
        text = ("{" + "".join(f"{k!r}: {v!r}, " for k, v in header.items()) + "}").encode()
        recipe.append(("npy_header", header))
    version = draw(st.sampled_from(((1, 0), (1, 0), (2, 0), (3, 0), (0, 0), (9, 9))))
    length = draw(st.one_of(st.none(), interesting_ints))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    method = draw(st.sampled_from(((zipfile.ZIP_STORED, "stored"), (zipfile.ZIP_DEFLATED, "deflated"))))
    members[name] = npy_member(version, text, data[:cut] if cut is not None else data, length)
    recipe.append(("npy_member", name, version, "length", length, "data[:cut]", cut, method[1]))
    return rebuild_zip(members, method[0]), recipe


ST_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64",
             "F8_E4M3", "F8_E5M2", "F4", "X", "", 7, None)
st_dims = st.one_of(st.sampled_from((0, 1, 2, 4, 10, 2**31, 2**32, 2**53, 2**63 - 1, 2**64, -1, 1.5, "3")),
                    st.integers(0, 100))


@st.composite
def safetensors_rewrite(draw, base: Base):
    """A safetensors file whose JSON header (or its 8-byte length) was edited."""
    n = int.from_bytes(base.raw[:8], "little")
    header = json.loads(base.raw[8:8 + n])
    body = base.raw[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    recipe = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(("dtype", "shape", "offsets", "drop", "rename", "meta", "entry", "text")))
        key = draw(st.sampled_from(keys))
        entry = isinstance(header.get(key), dict)   # still a tensor entry (not dropped, renamed or replaced)
        if what == "dtype" and entry:
            header[key]["dtype"] = value = draw(st.sampled_from(ST_DTYPES))
        elif what == "shape" and entry:
            header[key]["shape"] = value = draw(st.lists(st_dims, max_size=5))
        elif what == "offsets" and entry:
            header[key]["data_offsets"] = value = draw(st.one_of(
                st.lists(st.one_of(st.sampled_from(INTERESTING), st.integers(0, len(body) + 8)), min_size=2,
                         max_size=2),
                st.lists(st.integers(-2, 3), max_size=3)))
        elif what == "drop":
            value = header.pop(key, None) is not None
        elif what == "rename" and key in header:
            value = draw(st.sampled_from(("", "fc.weight", "__metadata__", "a" * 300, "fc.\u00e9", "\x00",
                                          "features.0.weight.extra", "module.fc.weight")))
            header[value] = header.pop(key)
        elif what == "meta":
            header["__metadata__"] = value = draw(st.sampled_from(({"format": "pt"}, {"a": 1}, [1], "x", None,
                                                                   {"a": {"b": "c"}})))
        elif what == "entry" and key in header:
            header[key] = value = draw(st.sampled_from(({}, [], None, 1, {"dtype": "F32"},
                                                        {"dtype": "F32", "shape": [], "data_offsets": [0, 4]})))
        else:
            value = None
        recipe.append(("st_" + what, key, value))
    text = json.dumps(header).encode()
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.one_of(st.binary(max_size=64), st.sampled_from((b"{", b"{}", b"[]", b"null", b"{\"a\": " * 300,
                                                                       b"\xff\xfe{}", b"{\"x\": NaN}"))))
        recipe.append(("st_text", text))
    text += b" " * ((-len(text)) % 8)
    length = draw(st.one_of(st.just(len(text)), st.just(len(text)), interesting_ints))
    if length != len(text):
        recipe.append(("st_length", length))
    return length.to_bytes(8, "little") + text + body, recipe


@st.composite
def mutants(draw, base: Base):
    data, recipe = base.raw, []
    rewriters = []
    if base.suffix == ".safetensors":
        rewriters.append(safetensors_rewrite)
    if base.zip_members:
        rewriters.append(member_rewrite)
        if base.suffix == ".npz":
            rewriters.append(npy_header_rewrite)
    structured = bool(rewriters) and draw(st.booleans())
    if structured:
        data, recipe = draw(draw(st.sampled_from(rewriters))(base))
    # after a rewrite the offsets of the valid file's fields no longer hold: plain byte operations only
    ops = draw(st.lists(byte_ops([] if structured else base.fields, [] if structured else base.hot),
                        min_size=0 if structured else 1, max_size=4))
    return Mutant(apply_ops(data, ops), recipe + ops)


# --------------------------------------------------------------------------- the valid files

@dataclass
class Corpus:
    root: Path          # the arch module lives here; mutants are written under root / "m"
    bases: dict[str, Base]
    counter: list = field(default_factory=lambda: [0])

    def __repr__(self) -> str:
        return f"Corpus({self.root})"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))

    def write(self, base: Base, mutant: Mutant) -> Path:
        self.counter[0] += 1
        path = self.root / "m" / f"{base.name}-{self.counter[0]}-{uuid.uuid4().hex[:8]}{base.suffix}"
        path.write_bytes(mutant.data)
        return path


def _checkpoint_base(name: str, path: Path) -> Base:
    raw = path.read_bytes()
    base = Base(name, path.suffix, raw)
    if raw.startswith(b"PK\x03\x04"):
        base.fields = zip_fields(raw)
        with zipfile.ZipFile(path) as z:
            base.zip_members = {i.filename: z.read(i.filename) for i in z.infolist()}
        pkl = next(n for n in base.zip_members if n.endswith("data.pkl"))
        base.member_fields[pkl] = pickle_fields(base.zip_members[pkl])
        base.fields += [Field(f"data.pkl+{f.name}", raw.find(base.zip_members[pkl]) + f.offset, f.width)
                        for f in base.member_fields[pkl]]
    elif path.suffix == ".safetensors":
        n = int.from_bytes(raw[:8], "little")
        base.fields = [Field("st.header_len", 0, 8), Field("st.header_len_lo", 0, 4), Field("st.header_len_hi", 4, 4)]
        for m in __import__("re").finditer(rb"\d+", raw[8:8 + n]):   # the numbers of the JSON header, as ASCII
            base.hot.append(8 + m.start())
    else:   # legacy torch.save: pickles, then raw storages
        base.fields = pickle_fields(raw)
    return base


def _data_base(name: str, path: Path) -> Base:
    raw = path.read_bytes()
    base = Base(name, path.suffix, raw)
    if path.suffix == ".npz":
        base.fields = zip_fields(raw)
        with zipfile.ZipFile(path) as z:
            base.zip_members = {i.filename: z.read(i.filename) for i in z.infolist()}
            for info in z.infolist():
                member = base.zip_members[info.filename]
                data_start = 10 + int.from_bytes(member[8:10], "little")   # .npy 1.0: after magic, length, header
                base.member_fields[info.filename] = [
                    Field(f"{info.filename}.npy_headerlen", 8, 2), Field(f"{info.filename}.data0", data_start, 8),
                    Field(f"{info.filename}.data1", data_start + 8, 8)]
                if info.compress_type == zipfile.ZIP_STORED:   # the same, in place in the archive
                    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                    base.fields += [Field(f"{info.filename}.npy_version", start + 6, 2),
                                    Field(f"{info.filename}.npy_headerlen", start + 8, 2),
                                    Field(f"{info.filename}.data0", start + data_start, 8)]
                    head_end = raw.find(b"\n", start)
                    base.hot += [i for i in range(start + 10, head_end) if raw[i:i + 1].isdigit()]
    else:
        data_ranges = []
        with h5py.File(path, "r") as f:
            for ds in f.values():
                if ds.chunks:
                    for i in range(ds.id.get_num_chunks()):
                        info = ds.id.get_chunk_info(i)
                        data_ranges.append((info.byte_offset, info.byte_offset + info.size))
                else:
                    start = ds.id.get_offset()
                    data_ranges.append((start, start + ds.id.get_storage_size()))
        base.hot = [i for i in range(len(raw)) if not any(a <= i < b for a, b in data_ranges)]
        stated = raw.find(np.float64(4.0).tobytes(), max(0, raw.find(b"num_classes")))
        if b"num_classes" in raw and stated >= 0:   # the value of the num_classes attribute
            base.fields.append(Field("attr.num_classes", stated, 8))
    return base


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    global CANARY_DIR
    root = tmp_path_factory.mktemp("fuzz")
    (root / "m").mkdir()
    CANARY_DIR = root / "canary"
    CANARY_DIR.mkdir()
    (root / f"{NETS_MODULE}.py").write_text(NETS_SOURCE)
    # Importing this module would create the canary: a pickle naming one of its globals must not import it.
    (root / f"{EVIL_MODULE}.py").write_text(f"open({canary_path()!r}, 'w').close()\n\ndef boom():\n    return None\n")
    sys.path.insert(0, str(root))
    try:
        import importlib

        importlib.invalidate_caches()
        nets = importlib.import_module(NETS_MODULE)
        torch.manual_seed(0)
        sd = nets.SmallCNN(10).state_dict()
        ck = root / "valid"
        ck.mkdir()
        torch.save(sd, ck / "zip.pt")
        torch.save(sd, ck / "legacy.pt", _use_new_zipfile_serialization=False)
        safetensors_torch.save_file(sd, str(ck / "model.safetensors"))
        torch.save({"state_dict": sd, "evil": Evil()}, ck / "evil_zip.pt")
        torch.save({"state_dict": sd, "evil": Evil()}, ck / "evil_legacy.pt", _use_new_zipfile_serialization=False)
        torch.save({"state_dict": sd, "evil": EvilImport()}, ck / "evil_import.pt")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(NETS_MODULE, None)
        sys.modules.pop(EVIL_MODULE, None)
        for leftover in CANARY_DIR.iterdir():   # the evil module ran once while pickling EvilImport
            leftover.unlink()

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    y = np.arange(16, dtype=np.int64) % 4
    np.savez(ck / "stored.npz", x=x, y=y, num_classes=np.float64(4.0))   # a stated class count (a float: allowed)
    np.savez_compressed(ck / "deflated.npz", x=x, y=y)
    evil_y = np.empty(16, dtype=object)
    evil_y[:] = [Evil() for _ in range(16)]
    np.savez(ck / "evil.npz", x=x, y=evil_y)   # y is a pickled object array
    with h5py.File(ck / "contiguous.h5", "w") as f:
        f["images"] = x
        f["labels"] = y
    with h5py.File(ck / "chunked.h5", "w") as f:
        f.create_dataset("images", data=x, chunks=(4, 8, 8, 3), compression="gzip", shuffle=True, fletcher32=True)
        f.create_dataset("labels", data=y, chunks=(8,), compression="gzip")
        f.attrs["num_classes"] = np.float64(4.0)

    bases = {}
    for name in ("zip.pt", "legacy.pt", "model.safetensors", "evil_zip.pt", "evil_legacy.pt", "evil_import.pt"):
        bases[name] = _checkpoint_base(name.split(".")[0], ck / name)
    for name in ("stored.npz", "deflated.npz", "evil.npz", "contiguous.h5", "chunked.h5"):
        bases[name] = _data_base(name.split(".")[0], ck / name)
    return Corpus(root, bases)


@pytest.fixture
def in_corpus(corpus, monkeypatch):
    """The arch module importable: its directory on sys.path and the working directory (as --arch expects)."""
    monkeypatch.syspath_prepend(str(corpus.root))
    monkeypatch.chdir(corpus.root)
    yield corpus
    sys.modules.pop(EVIL_MODULE, None)


# --------------------------------------------------------------------------- the calls

def load_checkpoint(path: Path, arch: bool) -> None:
    load_model(path, ModelOptions(arch=ARCH if arch else None))


def load_and_iterate(path: Path) -> None:
    bundle = load_data(DataOptions(str(path), max_samples=8, batch_size=4))
    for _x, _y, _i in bundle.loader():
        pass


def test_valid_files_load(in_corpus):
    """The unmutated files: the plain ones load; the state dicts beside malicious extras are refused (their pickle
    names a global that can act: nothing run, nothing imported), so is the malicious npz; the invariants hold
    for all."""
    c = in_corpus
    for name in ("zip.pt", "legacy.pt", "model.safetensors"):
        p = c.root / "valid" / name
        assert check_invariants(name, p, lambda: load_checkpoint(p, True)) == "loaded"
        if name != "legacy.pt":   # warms torchvision's signature cache too
            assert check_invariants(name, p, lambda: load_checkpoint(p, False)) == "FtdoctorError"
    for name in ("evil_zip.pt", "evil_legacy.pt", "evil_import.pt"):   # refused by the pickle scan
        p = c.root / "valid" / name
        assert check_invariants(name, p, lambda: load_checkpoint(p, True)) == "FtdoctorError"
    for name in ("stored.npz", "deflated.npz", "contiguous.h5", "chunked.h5"):
        p = c.root / "valid" / name
        assert check_invariants(name, p, lambda: load_and_iterate(p)) == "loaded"
    p = c.root / "valid" / "evil.npz"
    assert check_invariants("evil.npz", p, lambda: load_and_iterate(p)) == "FtdoctorError"


def test_the_harness_catches_each_violation(in_corpus):
    """The invariants are not vacuous: a call that breaks one fails check_invariants."""
    c = in_corpus
    valid = c.root / "valid" / "zip.pt"
    for name in ("evil_zip.pt", "evil_import.pt"):   # 2: code from the file runs (full unpickling)
        evil = c.root / "valid" / name
        with pytest.raises(AssertionError, match="wrote, spawned or imported"):
            check_invariants(name, evil, lambda: torch.load(evil, weights_only=False))
        for leftover in CANARY_DIR.iterdir():
            leftover.unlink()
        sys.modules.pop(EVIL_MODULE, None)
    with pytest.raises(KeyError):                    # 1: an exception other than FtdoctorError
        check_invariants("zip.pt", valid, lambda: {}["x"])
    with pytest.raises(AssertionError, match="memory bound broken: peak RSS"):   # 4: RSS grows by a gigabyte
        check_invariants("zip.pt", valid, lambda: bytearray(RSS_LIMIT + (32 << 20)))

    def capped_bomb():   # 4: an allocation the cap refused, caught and reported: still a bomb (decided uncapped)
        try:
            bytearray(AS_HEADROOM + GB)
        except MemoryError as exc:
            raise FtdoctorError("too big", "smaller") from exc

    with pytest.raises(AssertionError, match="memory bound broken: an allocation failed only because"):
        check_invariants("zip.pt", valid, capped_bomb)

    def reservation():   # ... but a huge reservation that is never touched is not
        try:
            with open(valid, "rb") as f:
                f.read(AS_HEADROOM + GB)   # BufferedReader reserves n bytes, then shrinks to the file
        except MemoryError as exc:
            raise FtdoctorError("too big", "smaller") from exc

    assert check_invariants("zip.pt", valid, reservation) == "FtdoctorError"
    copy = c.root / "m" / "copy.pt"
    copy.write_bytes(valid.read_bytes())
    fd = os.open(copy, os.O_RDWR)
    try:
        with pytest.raises(AssertionError, match="modified"):   # 5: the input changes
            check_invariants("zip.pt", copy, lambda: os.write(fd, b"X"))
    finally:
        os.close(fd)


CHECKPOINTS = ("zip.pt", "legacy.pt", "model.safetensors")
EVIL_CHECKPOINTS = ("evil_zip.pt", "evil_legacy.pt", "evil_import.pt")
DATA_FILES = ("stored.npz", "deflated.npz", "evil.npz", "contiguous.h5", "chunked.h5")


def _fuzz_checkpoint(corpus: Corpus, name: str, data) -> None:
    base = corpus.bases[name]
    mutant = data.draw(mutants(base), label="mutant")
    # without --arch now and then: recognising a torchvision architecture must only refuse cleanly too
    arch = data.draw(st.sampled_from((True, True, True, False)), label="arch")
    path = corpus.write(base, mutant)
    check_invariants(name, path, lambda: load_checkpoint(path, arch))
    path.unlink()


def _fuzz_data(corpus: Corpus, name: str, data) -> None:
    base = corpus.bases[name]
    mutant = data.draw(mutants(base), label="mutant")
    path = corpus.write(base, mutant)
    check_invariants(name, path, lambda: load_and_iterate(path))
    path.unlink()


@pytest.mark.parametrize("name", CHECKPOINTS)
@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint(in_corpus, name, data):
    _fuzz_checkpoint(in_corpus, name, data)


@pytest.mark.parametrize("name", EVIL_CHECKPOINTS)
@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))
@given(data=st.data())
def test_fuzz_malicious_checkpoint_runs_no_code(in_corpus, name, data):
    _fuzz_checkpoint(in_corpus, name, data)


@pytest.mark.parametrize("name", DATA_FILES)
@FUZZ
@given(data=st.data())
def test_fuzz_data(in_corpus, name, data):
    _fuzz_data(in_corpus, name, data)


# --------------------------------------------------------------------------- the bugs this fuzzing found (fixed)

def _write(corpus: Corpus, name: str, data: bytes) -> Path:
    corpus.counter[0] += 1
    path = corpus.root / "m" / f"repro-{corpus.counter[0]}-{name}"
    path.write_bytes(data)
    return path


def _replace_once(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) >= 1 and len(old) == len(new)
    return raw.replace(old, new, 1)


def test_regression_hdf5_visititems(in_corpus):
    # the B-tree signature of the root group damaged: h5py's visititems raises RuntimeError
    path = _write(in_corpus, "tree.h5", _replace_once(in_corpus.bases["contiguous.h5"].raw, b"TREE", b"XREE"))
    check_invariants("contiguous.h5", path, lambda: load_and_iterate(path))


def test_regression_hdf5_bytes_name(in_corpus):
    path = _write(in_corpus, "name.h5", _replace_once(in_corpus.bases["contiguous.h5"].raw, b"labels\x00",
                                                      b"l\xffbels\x00"))
    check_invariants("contiguous.h5", path, lambda: load_and_iterate(path))


def test_regression_hdf5_lazy_read(in_corpus):
    raw = bytearray(in_corpus.bases["chunked.h5"].raw)
    with h5py.File(in_corpus.root / "valid" / "chunked.h5", "r") as f:
        first_chunk = f["images"].id.get_chunk_info(0).byte_offset
    raw[first_chunk + 4] ^= 0xFF      # deflate stream / fletcher32 checksum of the first image chunk broken
    path = _write(in_corpus, "chunk.h5", bytes(raw))
    check_invariants("chunked.h5", path, lambda: load_and_iterate(path))


def test_regression_npz_zip_version(in_corpus):
    raw = bytearray(in_corpus.bases["stored.npz"].raw)
    entry = raw.find(b"PK\x01\x02")                   # the first central-directory entry
    raw[entry + 6:entry + 8] = (64).to_bytes(2, "little")   # "version needed to extract" 6.4 (zipfile knows 6.3)
    path = _write(in_corpus, "version.npz", bytes(raw))
    check_invariants("stored.npz", path, lambda: load_and_iterate(path))


def test_regression_npz_declared_rows(in_corpus):
    members = dict(in_corpus.bases["stored.npz"].zip_members)
    _header, data = split_npy(members["x.npy"])
    members["x.npy"] = npy_member((1, 0), b"{'descr': '|u1', 'fortran_order': False, 'shape': (16, 8192, 8192, 3), }",
                                  data)
    path = _write(in_corpus, "rows.npz", rebuild_zip(members, zipfile.ZIP_STORED))   # 3.6 kB
    check_invariants("stored.npz", path, lambda: load_and_iterate(path))


@pytest.mark.parametrize("name", ["stored.npz", "chunked.h5"])
def test_regression_stated_classes_inf(in_corpus, name):
    base = in_corpus.bases[name]
    where = next(f for f in base.fields if f.name in ("num_classes.npy.data0", "attr.num_classes"))
    data = apply_ops(base.raw, [("field", where, 0x7FF0000000000000)])   # the float64 4.0 becomes inf
    if name.endswith(".npz"):   # keep the member's CRC valid: rebuild the archive around the edited member
        members = dict(base.zip_members)
        member_field = next(f for f in base.member_fields["num_classes.npy"] if f.name.endswith("data0"))
        members["num_classes.npy"] = apply_ops(members["num_classes.npy"], [("field", member_field,
                                                                              0x7FF0000000000000)])
        data = rebuild_zip(members, zipfile.ZIP_STORED)
    path = _write(in_corpus, name, data)
    check_invariants(name, path, lambda: load_and_iterate(path))


def test_regression_hdf5_unallocated_storage(in_corpus):
    # Not a mutant but the same class of input (a small file that expands): HDF5 allocates a dataset's storage
    # late, so a file may declare 16 float64 images of 3072x3072x3 without storing a byte of them. ftdoctor's
    # checks (image pixels, chunk size, batch bytes) all pass; nothing compares the declared size with
    # ds.id.get_storage_size(). Slow-ish (~4 s) and ~1.7 GiB RSS, by construction.
    path = in_corpus.root / "m" / "unallocated.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", shape=(16, 3072, 3072, 3), dtype="<f8")   # contiguous, never written
        f["labels"] = np.arange(16, dtype=np.int64) % 4
    assert path.stat().st_size < 4096
    check_invariants("contiguous.h5", path, lambda: load_and_iterate(path))
