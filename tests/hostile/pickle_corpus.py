"""The pickle corpus: payload checkpoints that would run code (each would create the canary file if a full
unpickler ever read it) and benign checkpoints as the libraries save them, all written by the tests, and the
two maintained scanners (picklescan, fickling) as oracles.

The classes the benign files hold (a hyper-parameter dataclass, an Enum) live in this importable module, as a
user's would live in their package: ftdoctor finds the Enum in this file's source without importing it.
"""
from __future__ import annotations

import argparse
import builtins
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import io
import marshal
import operator
import os
import pathlib
import pickle
import random
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class Mode(enum.Enum):
    """An Enum in a user's hyper-parameters (pickled as REDUCE of the class with its value)."""

    FINETUNE = "finetune"
    PROBE = "probe"


@dataclass
class HParams:
    """A user's hyper-parameter dataclass (pickled as NEWOBJ + BUILD)."""

    lr: float = 1e-3
    mode: Mode = Mode.FINETUNE
    out: pathlib.Path = pathlib.Path("runs/a")
    tags: tuple[str, ...] = ("a", "b")


# --- payloads -------------------------------------------------------------------------------------------

def _touch(canary: Path) -> str:
    return f"touch {canary}"


class Reduce:
    """An object whose pickle calls ``func(*args)`` when unpickled."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class ReduceEx(Reduce):
    def __reduce__(self):
        raise TypeError("only __reduce_ex__ is used")

    def __reduce_ex__(self, protocol):
        return (self.func, self.args)


def _s(text: str) -> bytes:                      # SHORT_BINUNICODE
    b = text.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _sg(module: str, name: str) -> bytes:          # STACK_GLOBAL
    return _s(module) + _s(name) + b"\x93"


def _u(text: str) -> bytes:                      # BINUNICODE
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _string0(text: str) -> bytes:                  # protocol 0 STRING
    return b"S" + repr(text).encode() + b"\n"


def raw_payloads(canary: Path) -> dict[str, bytes]:
    """Hand-assembled pickles: the tricks a scanner must follow (names built on the stack, memo reuse, INST,
    OBJ, BUILD through __setstate__, Python 2 names)."""
    cmd = _touch(canary)
    code = marshal.dumps(compile(f"open({str(canary)!r}, 'w')", "x", "exec"))
    assert len(code) < 256
    return {
        "proto0_global_reduce": b"cos\nsystem\n(" + _string0(cmd) + b"tR.",
        "proto0_py2_builtin_eval": b"c__builtin__\neval\n(" + _string0(f"__import__('os').system({cmd!r})") + b"tR.",
        "proto0_inst": b"(" + _string0(cmd) + b"ios\nsystem\n.",
        "proto1_obj": b"(cposix\nsystem\n" + _string0(cmd) + b"o.",
        # getattr(__import__('os'), 'system')(cmd), every name through STACK_GLOBAL
        "proto4_getattr_chain": (b"\x80\x04" + _sg("builtins", "getattr") + _sg("builtins", "__import__")
                                 + _s("os") + b"\x85R" + _s("system") + b"\x86R" + _s(cmd) + b"\x85R."),
        # the module and name strings memoised first, then fetched for STACK_GLOBAL
        "proto4_memo_names": (b"\x80\x04" + _s("posix") + b"\x94" + _s("system") + b"\x94" + b"00"
                              + b"h\x00h\x01\x93" + _s(cmd) + b"\x85R."),
        # os.system memoised, popped, fetched again from the memo and called
        "proto2_memo_reuse": b"\x80\x02cposix\nsystem\nq\x000]q\x01h\x00" + _u(cmd) + b"\x85Ra.",
        # a Namespace whose __setstate__ becomes os.system (BUILD with slot state), then BUILD calls it
        "proto2_build_setstate": (b"\x80\x02cargparse\nNamespace\n)\x81N}" + _u("__setstate__")
                                  + b"cposix\nsystem\ns\x86b" + _u(cmd) + b"b."),
        "proto2_subprocess_popen": b"\x80\x02csubprocess\nPopen\n(" + _u("touch") + _u(str(canary)) + b"l\x85R.",
        # FunctionType(marshal.loads(code), {})(): a function built from bytes, then called
        "proto2_function_from_marshal": (b"\x80\x02ctypes\nFunctionType\ncmarshal\nloads\nC"
                                         + bytes([len(code)]) + code + b"\x85R}\x86R)R."),
        "proto4_runpy": b"\x80\x04" + _sg("runpy", "_run_code") + _s(f"open({str(canary)!r}, 'w')") + b"}\x86R.",
        # __import__('this'): importing a module acts by itself (this one prints)
        "proto4_dunder_import": b"\x80\x04" + _sg("builtins", "__import__") + _s("this") + b"\x85R.",
    }


def object_payloads(canary: Path) -> dict[str, object]:
    """Objects whose pickle would call something that acts."""
    cmd = _touch(canary)
    c = str(canary)
    return {
        "os_system": Reduce(os.system, cmd),
        "builtins_exec": Reduce(builtins.exec, f"open({c!r}, 'w')"),
        "builtins_eval": Reduce(builtins.eval, f"open({c!r}, 'w')"),
        "builtins_open": Reduce(builtins.open, c, "w"),
        "builtins_compile": Reduce(builtins.compile, "1", "x", "exec"),
        "subprocess_run": Reduce(subprocess.run, ["touch", c]),
        "subprocess_check_output": Reduce(subprocess.check_output, ["touch", c]),
        "functools_partial": Reduce(functools.partial, os.system, cmd),
        "operator_attrgetter": Reduce(operator.attrgetter, "system"),
        "operator_methodcaller": Reduce(operator.methodcaller, "system", cmd),
        "shutil_copyfile": Reduce(shutil.copyfile, __file__, c),
        "io_open": Reduce(io.open, c, "w"),
        "pickle_loads_nested": Reduce(pickle.loads, pickle.dumps(Reduce(os.system, cmd))),
        "sys_exit": Reduce(sys.exit, 3),
        "reduce_ex": ReduceEx(os.system, cmd),
        "timeit": Reduce(__import__("timeit").timeit, f"open({c!r}, 'w')"),
        "cprofile_run": Reduce(__import__("cProfile").run, f"open({c!r}, 'w')"),
        "webbrowser_open": Reduce(__import__("webbrowser").open, "http://127.0.0.1:9/"),
        "socket_connect": Reduce(__import__("socket").create_connection, ("127.0.0.1", 9)),
        "ctypes_cdll": Reduce(__import__("ctypes").CDLL, "libc.so.6"),
        "importlib_import": Reduce(__import__("importlib").import_module, "antigravity"),
        "torch_load": Reduce(torch.load, c),
        "numpy_runstring": Reduce(__import__("numpy.testing._private.utils", fromlist=["runstring"]).runstring,
                                  f"open({c!r}, 'w')", {}),
        # a callable on no list: ZipFile(path, "w") creates the file; it is not data, so it is unsafe
        "zipfile_create": Reduce(__import__("zipfile").ZipFile, c, "w"),
        "tempfile_mkstemp": Reduce(__import__("tempfile").mkstemp),
    }


def containers(evil: object, sd: dict) -> dict[str, object]:
    """The payload nested where a checkpoint keeps its extras."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9).state_dict()
    opt["param_groups"][0]["evil"] = evil
    return {
        "in_list": {"state_dict": sd, "callbacks": [1, evil]},
        "in_dict": {"state_dict": sd, "meta": {"a": {"b": evil}}},
        "in_ordereddict": {"state_dict": sd, "meta": collections.OrderedDict(x=evil)},
        "in_tuple": {"state_dict": sd, "meta": (1, (2, evil))},
        "in_hyper_parameters": {"state_dict": sd, "hyper_parameters": {"lr": 0.1, "loss": evil}},
        "in_optimizer_state": {"state_dict": sd, "optimizer_states": [opt]},
    }


# --- benign: as the libraries save them ---------------------------------------------------------------------

def metadata() -> dict[str, object]:
    """The plain data a training script keeps beside its weights."""
    return {"when": datetime.datetime(2026, 12, 5, 12, 0), "took": datetime.timedelta(seconds=3),
            "recent": collections.deque([1, 2]), "by_class": collections.defaultdict(list, {1: [2]}),
            "counts": collections.Counter("aab"), "seen": {1, 2}, "frozen": frozenset({3}), "z": 1 + 2j,
            "raw": b"\x00\x01", "buf": bytearray(b"xy"), "span": range(3), "cut": slice(1, 2),
            "price": decimal.Decimal("1.5"), "ratio": fractions.Fraction(1, 3), "dir": pathlib.Path("/data"),
            "ns": types.SimpleNamespace(a=1), "args": argparse.Namespace(lr=0.1, epochs=3),
            "hp": HParams(), "mode": Mode.PROBE, "array": np.arange(4, dtype=np.float32),
            "np_scalar": np.float64(0.5), "python_rng": random.Random(0).getstate(),
            "numpy_rng": np.random.get_state()}


def dataclass_fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# --- the oracles -----------------------------------------------------------------------------------------

def picklescan_flags(path: Path) -> bool:
    """picklescan's verdict: a dangerous global found (or the file could not be scanned)."""
    from picklescan.scanner import scan_directory_path, scan_file_path

    result = scan_directory_path(str(path)) if path.is_dir() else scan_file_path(str(path))
    return bool(result.issues_count or result.infected_files or result.scan_err)


def fickling_flags(path: Path) -> bool:
    """fickling's verdict on every pickle of the file (zip entries, or the pickles in a row of a legacy or raw
    file): anything above 'likely safe'."""
    import zipfile

    from fickling.analysis import Severity, check_safety
    from fickling.fickle import StackedPickle

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        blobs: list[bytes] = []
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        elif file.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            blobs = [file.read_bytes()]
        for blob in blobs:
            try:
                stacked = StackedPickle.load(io.BytesIO(blob))
            except Exception:  # noqa: BLE001 - fickling cannot parse it: it cannot call it safe
                return True
            for pickled in stacked:
                try:
                    if check_safety(pickled).severity > Severity.LIKELY_SAFE:
                        return True
                except Exception:  # noqa: BLE001
                    return True
    return False
