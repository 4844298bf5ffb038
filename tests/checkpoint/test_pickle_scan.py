"""The pickle scan's rules and walk (issue 24), against independent truth: picklescan's and fickling's own
deny lists (every global they call dangerous is unsafe here), pickletools' positions (offsets), hand-assembled
opcodes (EXT, computed names, memo reuse), and damaged files that must never raise."""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftdoctor.checkpoint.pickle_rules import CALL, INERT, NEW, REFERENCE, STATE, UNSAFE, WEIGHTS, classify
from ftdoctor.checkpoint.pickle_scan import scan_checkpoint


def _global(module: str, name: str, proto: int = 2) -> bytes:
    """A pickle that calls module.name() through GLOBAL + REDUCE (no import happens: it is never loaded)."""
    return (b"\x80" + bytes([proto]) + b"c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b")R.")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the rules against the peers' lists -----------------------------------------------------------------

def _picklescan_entries():
    from picklescan.scanner import _unsafe_globals
    for module, names in sorted(_unsafe_globals.items()):
        for name in (["system", "anything"] if names == "*" else sorted(names)):
            yield module, name


def test_every_global_picklescan_calls_dangerous_is_unsafe_here():
    entries = list(_picklescan_entries())
    assert len(entries) > 60
    safe_here = [f"{m}.{n}" for m, n in entries if classify(m, n, {CALL}, opcode="REDUCE").kind != UNSAFE]
    assert not safe_here, safe_here


def test_every_import_fickling_calls_unsafe_is_unsafe_here_when_called():
    from fickling.fickle import UNSAFE_IMPORTS
    assert len(UNSAFE_IMPORTS) > 10
    safe_here = [m for m in sorted(UNSAFE_IMPORTS) if classify(m, "anything", {CALL}).kind != UNSAFE]
    assert not safe_here, safe_here


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"), ("builtins", "eval"),
    ("__builtin__", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("builtins", "open"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("runpy", "run_path"), ("importlib", "import_module"),
    ("pickle", "loads"), ("marshal", "loads"), ("dill", "loads"), ("types", "CodeType"),
    ("types", "FunctionType"), ("functools", "partial"), ("operator", "attrgetter"),
    ("operator", "methodcaller"), ("shutil", "rmtree"), ("socket", "create_connection"),
    ("webbrowser", "open"), ("sys", "exit"), ("pty", "spawn"), ("ctypes", "CDLL"), ("torch", "load"),
    ("numpy.testing._private.utils", "runstring"), ("collections", "namedtuple"),
    ("builtins", "object.__subclasses__"), ("torch", "__builtins__"),
])
def test_the_issue_list_is_unsafe_by_name_even_if_only_named(module, name):
    """The issue's list: unsafe however the pickle uses it, and each rule says why in words."""
    for uses in ({CALL}, {REFERENCE}):
        rule = classify(module, name, uses)
        assert rule.kind == UNSAFE and len(rule.reason) > 10, (module, name, uses, rule)


@pytest.mark.parametrize("module, name, uses, kind", [
    ("torch._utils", "_rebuild_tensor_v2", {CALL}, WEIGHTS),           # what weights_only allows
    ("collections", "OrderedDict", {CALL}, WEIGHTS),
    ("torch", "FloatStorage", {REFERENCE}, WEIGHTS),
    ("argparse", "Namespace", {NEW, STATE}, INERT),                    # data holders
    ("pathlib", "PosixPath", {CALL}, INERT),
    ("pytorch_lightning.utilities.parsing", "AttributeDict", {CALL}, INERT),
    ("my_project.config", "HParams", {NEW, STATE}, INERT),             # any class restored from its state
    ("my_project.config", "make_model", {REFERENCE}, INERT),           # named, never called
    ("my_project.config", "make_model", {CALL}, UNSAFE),               # an unknown callable the pickle calls
    ("__main__", "Mode", {CALL}, UNSAFE),                               # source cannot be read
    ("numpy", "dtype", {CALL}, INERT),
    ("datetime", "datetime", {CALL}, INERT),
    ("my_project.config", "HParams", {NEW, STATE, "mutate"}, UNSAFE),  # BUILD on the class itself
])
def test_kinds_by_use(module, name, uses, kind):
    assert classify(module, name, uses, opcode="REDUCE").kind == kind


def test_an_enum_is_inert_only_when_its_source_says_enum(tmp_path, monkeypatch):
    """An Enum called by REDUCE (as pickle restores enum members) is found in its module's source with ast;
    the module is never imported (its top level would run a canary)."""
    (tmp_path / "ftd_enum_mod.py").write_text(
        "import enum, os\nopen(os.environ['FTD_CANARY'], 'w').close()\n"
        "class Base(enum.Enum):\n    A = 1\nclass Mode(Base):\n    B = 2\n"
        "class Holder:\n    class Inner(enum.IntFlag):\n        X = 1\n"
        "def Fake(*a):\n    return 1\n")
    canary = tmp_path / "canary"
    monkeypatch.setenv("FTD_CANARY", str(canary))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert classify("ftd_enum_mod", "Mode", {CALL}).kind == INERT                # through its own base class
    assert classify("ftd_enum_mod", "Holder.Inner", {CALL}).kind == INERT        # nested, a Flag
    assert classify("ftd_enum_mod", "Fake", {CALL}).kind == UNSAFE
    assert classify("ftd_enum_mod", "Missing", {CALL}).kind == UNSAFE
    assert classify("ftd_enum_missing_module", "Mode", {CALL}).kind == UNSAFE
    assert not canary.exists()


# --- the walk ---------------------------------------------------------------------------------------------

def test_the_offset_is_pickletools_position_of_the_opcode_that_applies_it(tmp_path):
    data = pickle.dumps([1, 2], protocol=2)[:-2] + b"cposix\nsystem\n(S'true'\ntRa."
    path = _write(tmp_path, "raw.pkl", data)
    reduce_at = [pos for op, arg, pos in pickletools.genops(data) if op.name == "REDUCE"]
    found = scan_checkpoint(path).acting
    assert [(f.name, f.opcode, f.offset) for f in found] == [("posix.system", "REDUCE", reduce_at[0])]
    assert found[0].describe() == f"posix.system (REDUCE, offset {reduce_at[0]})"


def test_offsets_inside_a_zip_name_the_pickle_and_the_first_call(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": [Evil(), Evil(), Evil()]}, path)
    with zipfile.ZipFile(path) as z:
        data = z.read("evil/data.pkl")
    reduce_at = [pos for op, arg, pos in pickletools.genops(data) if op.name == "REDUCE"]
    (finding,) = scan_checkpoint(path).acting
    assert finding.pickle == "evil/data.pkl" and finding.name == "posix.system" and finding.file == ""
    assert finding.offset in reduce_at                                   # the first of its three calls
    assert finding.count == 1                                             # how often it is named


@pytest.mark.parametrize("opcode", [b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00"])
def test_ext_codes_are_unsafe_since_the_registry_decides_what_they_import(tmp_path, opcode):
    path = _write(tmp_path, "ext.pkl", b"\x80\x02" + opcode + b")R.")
    found = scan_checkpoint(path).acting
    assert found[0].opcode.startswith("EXT") and found[0].name.startswith("extension code") and found[0].offset == 2
    assert "registry" in found[0].reason


def test_computed_and_memoised_names_are_followed(tmp_path):
    """STACK_GLOBAL names from the memo, getattr chains, and a name built at load time (unknowable)."""
    memo = (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x94h\x02\x8c\x04true\x85R.")   # memo reuse
    getattr_chain = (b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93\x8c\x02os\x8c\x04path\x93\x8c\x04join\x86R.")
    computed = (b"\x80\x04\x8c\x08builtins\x8c\x03str\x93)R\x8c\x03abs\x93)R.")    # module from a call result
    names = {}
    for label, data in (("memo", memo), ("getattr", getattr_chain), ("computed", computed)):
        list(pickletools.genops(data))                                              # each parses to its STOP
        names[label] = {f.name for f in scan_checkpoint(_write(tmp_path, f"{label}.pkl", data)).acting}
    assert "posix.system" in names["memo"]
    assert "builtins.getattr" in names["getattr"]
    assert names["computed"], names


def test_a_pickle_inside_bytes_is_scanned(tmp_path):
    inner = _global("os", "system")
    outer = pickle.dumps({"blob": inner, "text": inner.decode("latin1")}, protocol=4)
    found = scan_checkpoint(_write(tmp_path, "nested.pkl", outer)).acting
    assert len(found) == 2 and all(f.name == "os.system" and "a pickle inside" in f.pickle for f in found), found


def test_safetensors_and_an_empty_folder_have_no_pickle(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    scan = scan_checkpoint(tmp_path / "m.safetensors")
    assert scan.safe and scan.verdict == "no pickle" and scan.pickles == ()


# --- never a traceback, whatever the bytes ---------------------------------------------------------------

def _good_zip(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "good.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3, "name": "x"}}, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    return {"zip": _good_zip(tmp_path_factory), "legacy": legacy.getvalue(),
            "raw": pickle.dumps({"a": [1.5, "b", (1, 2)], "c": b"xy"}, protocol=2)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["zip", "legacy", "raw"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_damaged_pickles_never_raise_and_are_never_called_safe_past_the_damage(good_files, tmp_path, kind, cut,
                                                                               flips):
    data = bytearray(good_files[kind])
    for where, byte in flips:
        data[int(where * (len(data) - 1))] = byte
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1 else bytes(data)
    path = _write(tmp_path, f"f.{kind}", data)
    scan = scan_checkpoint(path)                                  # never raises
    assert scan.verdict in ("safe", "unsafe", "no pickle")
    assert isinstance(scan.summary(), str) and scan.to_json()["verdict"] == scan.verdict
    if scan.safe and scan.pickles:                                # what is called safe loads under weights_only,
        try:                                                      # or fails there without running anything
            torch.load(path, weights_only=True)
        except Exception:
            pass


def test_a_truncated_pickle_is_damage_with_its_offset(tmp_path):
    data = pickle.dumps({"a": list(range(50))}, protocol=2)
    path = _write(tmp_path, "cut.pkl", data[: len(data) // 2])
    (finding,) = scan_checkpoint(path).unsafe
    assert finding.damage and finding.name == "a damaged pickle" and 0 < finding.offset <= len(data) // 2
    assert scan_checkpoint(path).acting == ()


def test_the_scan_reads_each_pickle_once_and_leaves_storages_alone(tmp_path, monkeypatch):
    """Nothing slower than one extra read: the data.pkl is read once, the storages never."""
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1 << 20)}, path)
    reads = []
    real = zipfile.ZipFile.open

    def counting(self, name, *a, **k):
        reads.append(name if isinstance(name, str) else name.filename)
        return real(self, name, *a, **k)
    monkeypatch.setattr(zipfile.ZipFile, "open", counting)
    scan = scan_checkpoint(path)
    assert scan.safe and scan.pickles == ("big.pt: big/data.pkl",)
    assert [r for r in reads if r.endswith(".pkl")] == ["big/data.pkl"]
    assert not [r for r in reads if "/data/" in r]
