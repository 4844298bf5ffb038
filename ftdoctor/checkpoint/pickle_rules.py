"""Which globals a checkpoint's pickle may name: every rule of the pickle scan (:mod:`.pickle_scan`), in one place.

A pickle is a small program: ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` import a
name, and ``REDUCE`` / ``INST`` / ``OBJ`` call it with arguments from the file,
``NEWOBJ`` makes an instance of it, ``BUILD`` sets that instance's state. Each
global a pickle names is one of three kinds, decided by its name and by what the
pickle does with it:

* **weights** — what ``torch.load(weights_only=True)`` allows (tensors, storages,
  dtypes, ``OrderedDict``, ...): read for real.
* **inert data** — a class that only holds data: the parsed arguments of
  ``argparse``, ``pathlib`` paths, Lightning's ``AttributeDict``, OmegaConf
  containers, numpy arrays and random states, dates; an instance of *any* class
  restored the way pickle restores objects (``NEWOBJ`` / ``copyreg._reconstructor``
  then ``BUILD``: ``cls.__new__`` and its state, no call with the file's
  arguments), which covers a user's dataclass; an ``Enum`` called with its value
  (``REDUCE``), when the class is found to be one in its module's source (read with
  :mod:`ast` from the path, never imported); a name only referenced, never called.
  ftdoctor reads these as inert placeholders (:mod:`.inert`).
* **unsafe** — anything that acts: a module or name of :data:`UNSAFE_MODULES` /
  :data:`UNSAFE_NAMES` wherever it appears (even unused: importing some of them
  acts), a dunder attribute (``__dict__``, ``__globals__``: a way around any list),
  any other callable the pickle *calls* (``REDUCE``, ``INST``, ``OBJ``) that is not
  of the first two kinds, state set on an imported object itself (``BUILD`` or
  ``SETITEM`` on a global: it changes code the loader has).

The denylist is a superset of picklescan's (``tests/checkpoint/test_pickle_scan.py``
checks it against the installed picklescan), written out here so that a verdict does
not depend on what else is installed.
"""
from __future__ import annotations

import _compat_pickle
import ast
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

WEIGHTS, INERT, UNSAFE = "weights", "inert", "unsafe"

#: what the pickle does with a global (see :mod:`.pickle_scan`)
CALL, NEW, STATE, MUTATE, REFERENCE = "call", "new", "state", "mutate", "reference"


@dataclass(frozen=True)
class Rule:
    """The kind of one global (:data:`WEIGHTS`, :data:`INERT` or :data:`UNSAFE`) and why, in words."""

    kind: str
    reason: str


_RUNS = "runs programs"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections"
_CODE = "runs code given to it"
_LOADS = "unpickles (and so runs) more data"

#: modules (and their submodules) whose globals act; importing some of them acts by itself
UNSAFE_MODULES: Mapping[str, str] = {
    "os": f"{_RUNS} and {_FILES} (os.system, os.remove, ...)", "posix": f"{_RUNS} and {_FILES}, as os does under its Unix name",
    "nt": f"{_RUNS} and {_FILES}, as os does under its Windows name", "subprocess": _RUNS, "pty": f"{_RUNS} on a terminal",
    "shutil": "copies, moves and deletes files and trees", "sys": "the interpreter's state: modules, hooks, exit",
    "socket": _NET, "ssl": _NET, "asyncio": f"{_RUNS} and {_NET}", "selectors": _NET, "socketserver": _NET,
    "http": _NET, "httplib": _NET, "urllib": _NET, "urllib2": _NET, "ftplib": _NET, "smtplib": _NET,
    "poplib": _NET, "imaplib": _NET, "nntplib": _NET, "telnetlib": _NET, "xmlrpc": _NET, "requests": _NET,
    "aiohttp": _NET, "webbrowser": "opens addresses in a browser", "antigravity": "importing it opens a browser",
    "this": "importing it prints", "__hello__": "importing it prints", "__phello__": "importing it prints",
    "turtle": "opens a window", "turtledemo": "opens a window", "tkinter": "opens windows", "idlelib": _CODE,
    "ctypes": "loads native libraries and calls into memory", "_ctypes": "loads native libraries",
    "runpy": "runs modules and scripts", "importlib": "imports (and so runs) any module",
    "pkgutil": "imports (and so runs) any module", "imp": "imports (and so runs) any module",
    "pickle": _LOADS, "_pickle": _LOADS, "cPickle": _LOADS, "pickletools": _LOADS, "marshal": "loads code objects",
    "dill": _LOADS, "cloudpickle": _LOADS, "joblib": _LOADS, "shelve": _LOADS,
    "code": _CODE, "codeop": "compiles code", "pdb": _CODE, "bdb": _CODE, "cProfile": _CODE, "profile": _CODE,
    "trace": _CODE, "timeit": _CODE, "doctest": _CODE, "pydoc": "imports (and so runs) any module",
    "inspect": "reaches any object's code and frames", "gc": "reaches every live object",
    "pip": "installs and runs packages", "ensurepip": "installs and runs packages", "venv": _RUNS,
    "distutils": f"{_RUNS} and {_FILES}", "setuptools": f"{_RUNS} and {_FILES}", "lib2to3": "compiles code",
    "multiprocessing": f"starts processes and {_LOADS}", "concurrent": "starts threads and processes",
    "threading": "starts threads", "_thread": "starts threads", "signal": "installs signal handlers",
    "resource": "changes process limits", "fcntl": "controls file descriptors", "termios": "controls terminals",
    "tempfile": "creates files", "io": "opens files (io.open)", "_io": "opens files (_io.FileIO)",
    "fileinput": "opens files", "mmap": "maps files into memory", "sqlite3": "opens and writes databases",
    "dbm": "opens and writes databases", "logging": "its handlers open files and sockets",
    "platform": f"{_RUNS} (platform.popen)", "uuid": f"{_RUNS} on some systems (uuid's helpers)",
    "_osx_support": _RUNS, "_aix_support": _RUNS, "_pyrepl": _CODE, "test": "CPython's own tests: runs code",
    "numpy.f2py": "compiles and runs code", "numpy.testing": "runs code strings (runstring)",
    "numpy.distutils": _RUNS, "yaml": "its loaders build arbitrary objects", "pandas.io.pickle": _LOADS,
    "torch.hub": "downloads and runs code", "torch.utils.cpp_extension": "compiles and loads native code",
    "torch._inductor": "compiles and runs code", "torch._dynamo": _CODE, "torch.utils.collect_env": _RUNS,
    "torch.utils.bottleneck": _CODE, "torch.utils._config_module": _LOADS, "torch.package": _LOADS,
    "torch.utils.data.datapipes": _FILES, "torch.fx.experimental.symbolic_shapes": "evaluates code strings",
    "torch.jit.unsupported_tensor_ops": _CODE, "torch._export": _LOADS, "torch.export": _LOADS,
}

#: single names that act (their modules are otherwise judged by use)
UNSAFE_NAMES: Mapping[tuple[str, str], str] = {
    **{("builtins", n): _CODE for n in ("eval", "exec", "compile", "execfile", "apply", "breakpoint", "input",
                                          "help")},
    ("builtins", "open"): _FILES, ("builtins", "file"): _FILES, ("builtins", "reload"): "re-runs a module",
    ("builtins", "__import__"): "imports (and so runs) any module",
    ("builtins", "getattr"): "reaches any attribute of any object: a way to any function",
    ("builtins", "setattr"): "changes any object, code the loader has included",
    ("builtins", "delattr"): "changes any object, code the loader has included",
    ("builtins", "globals"): "reaches the loader's namespace", ("builtins", "locals"): "reaches the loader's namespace",
    ("builtins", "vars"): "reaches any object's namespace", ("builtins", "type"): "makes new classes",
    ("builtins", "exit"): "ends the loading process", ("builtins", "quit"): "ends the loading process",
    ("functools", "partial"): "binds a callable to arguments for a later call",
    ("functools", "partialmethod"): "binds a callable to arguments for a later call",
    ("functools", "reduce"): "calls a callable over the file's data",
    ("operator", "attrgetter"): "reaches any attribute of any object",
    ("operator", "methodcaller"): "calls any method of any object",
    ("operator", "itemgetter"): "reaches into objects for a later call", ("operator", "call"): "calls anything",
    ("_operator", "attrgetter"): "reaches any attribute of any object",
    ("_operator", "methodcaller"): "calls any method of any object",
    ("_operator", "itemgetter"): "reaches into objects for a later call", ("_operator", "call"): "calls anything",
    ("collections", "namedtuple"): "builds a class with exec", ("torch", "load"): _LOADS,
    ("torch.serialization", "load"): _LOADS, ("torch", "save"): _FILES, ("torch.serialization", "save"): _FILES,
    ("torch", "from_file"): _FILES, ("torch.storage", "_load_from_bytes"): _LOADS,
    **{("numpy", n): _FILES for n in ("load", "save", "savez", "savez_compressed", "savetxt", "loadtxt",
                                        "genfromtxt", "fromfile", "memmap", "tofile")},
    ("numpy", "loads"): _LOADS, ("pandas", "read_pickle"): _LOADS,
    **{("copyreg", n): "changes pickle's registry" for n in ("add_extension", "pickle", "constructor")},
    **{("types", n): "makes functions, code objects, modules or classes" for n in (
        "CodeType", "FunctionType", "LambdaType", "MethodType", "ModuleType", "CellType", "new_class",
        "prepare_class", "coroutine", "BuiltinFunctionType", "BuiltinMethodType")},
}

_TENSOR_DATA = "builds an array, dtype or random-number state from the file's bytes"
_AD = "Lightning's hyper-parameter dict"

#: classes that only hold data (an explicit list: a call of them, REDUCE included, builds data)
INERT_NAMES: Mapping[tuple[str, str], str] = {
    **{("builtins", n): "a built-in data type" for n in (
        "object", "int", "float", "complex", "str", "bytes", "bytearray", "bool", "list", "tuple", "dict", "set",
        "frozenset", "slice", "range", "NoneType", "Ellipsis", "NotImplemented")},
    ("argparse", "Namespace"): "an attribute holder (argparse's parsed arguments)",
    ("types", "SimpleNamespace"): "an attribute holder",
    **{("pathlib", n): "a path (a string with methods: nothing is opened when it is made)" for n in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
    ("lightning.fabric.utilities.data", "AttributeDict"): _AD,
    ("lightning_fabric.utilities.data", "AttributeDict"): _AD,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): _AD,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): _AD,
    **{("omegaconf." + m, n): "an OmegaConf config container" for m, n in (
        ("dictconfig", "DictConfig"), ("listconfig", "ListConfig"), ("base", "ContainerMetadata"),
        ("base", "Metadata"), ("nodes", "AnyNode"), ("nodes", "StringNode"), ("nodes", "IntegerNode"),
        ("nodes", "FloatNode"), ("nodes", "BooleanNode"), ("nodes", "EnumNode"), ("nodes", "PathNode"),
        ("nodes", "BytesNode"), ("nodes", "ValueNode"))},
    **{("collections", n): "a container" for n in ("defaultdict", "deque", "Counter", "OrderedDict", "ChainMap")},
    **{("datetime", n): "a date or time" for n in ("datetime", "date", "time", "timedelta", "timezone")},
    ("decimal", "Decimal"): "a number", ("fractions", "Fraction"): "a number", ("typing", "Any"): "a type hint",
    ("copyreg", "_reconstructor"): "pickle's way to restore an object of a class (cls.__new__, then its state)",
    ("copyreg", "__newobj__"): "pickle's way to restore an object of a class (cls.__new__, then its state)",
    ("copyreg", "__newobj_ex__"): "pickle's way to restore an object of a class (cls.__new__, then its state)",
    **{(m, n): _TENSOR_DATA for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): _TENSOR_DATA, ("numpy", "dtype"): _TENSOR_DATA,
    **{("numpy.random._pickle", n): _TENSOR_DATA for n in (
        "__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor")},
    **{("numpy.random." + m, n): _TENSOR_DATA for m, n in (
        ("_mt19937", "MT19937"), ("_pcg64", "PCG64"), ("_pcg64", "PCG64DXSM"), ("_philox", "Philox"),
        ("_sfc64", "SFC64"), ("mtrand", "RandomState"), ("_generator", "Generator"),
        ("bit_generator", "SeedSequence"), ("bit_generator", "__pyx_unpickle_SeedSequence"))},
    ("torch.torch_version", "TorchVersion"): "a version string",
    # what transformers' Trainer writes into training_args.bin, for a CI without transformers installed
    **{("transformers.trainer_utils", n): "a transformers training-argument enum" for n in (
        "IntervalStrategy", "SaveStrategy", "HubStrategy", "SchedulerType", "EvaluationStrategy", "FSDPOption",
        "ShardedDDPOption")},
    ("transformers.training_args", "OptimizerNames"): "a transformers training-argument enum",
    ("transformers.debug_utils", "DebugOption"): "a transformers training-argument enum",
    **{("accelerate.utils.dataclasses", n): "an accelerate enum" for n in (
        "DistributedType", "PrecisionType", "DynamoBackend", "ComputeEnvironment", "SageMakerDistributedType")},
}

#: TorchScript's own unpickler resolves these (C++, no Python import): they restore lists and type tags
TORCHSCRIPT_BUILTINS = "torch.jit._pickle"


def normalise(module: str, name: str) -> tuple[str, str]:
    """Python 2 names as Python 3's unpickler maps them (``__builtin__`` -> ``builtins``, ``copy_reg`` ->
    ``copyreg``), so no rule can be dodged by the old spelling."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def classify(module: str, name: str, uses: Iterable[str], *, opcode: str = "") -> Rule:
    """The :class:`Rule` for the global ``module.name`` that the pickle uses in the ways ``uses``
    (:data:`CALL`, :data:`NEW`, :data:`STATE`, :data:`MUTATE`, :data:`REFERENCE`); ``opcode`` names the
    call in the reason (``REDUCE``)."""
    module, name = normalise(module, name)
    uses = frozenset(uses)
    parts = [*module.split("."), *name.split(".")]
    if any(len(p) > 4 and p.startswith("__") and p.endswith("__") and p not in ("__main__", "__torch__",
                                                                                 "__newobj__", "__newobj_ex__")
           for p in parts):
        return Rule(UNSAFE, "a dunder attribute (__dict__, __globals__, __builtins__ ...): a way to any object")
    unsafe = _unsafe_reason(module, name)
    if unsafe is not None:
        return Rule(UNSAFE, unsafe)
    if MUTATE in uses:
        return Rule(UNSAFE, "the pickle sets state on the imported object itself (BUILD or SETITEM on a global): "
                            "it changes code the loader has")
    if f"{module}.{name}" in _weights_allowed():
        return Rule(WEIGHTS, "allowed by torch.load(weights_only=True)")
    if (module, name) in INERT_NAMES:
        return Rule(INERT, INERT_NAMES[(module, name)])
    if module == TORCHSCRIPT_BUILTINS:
        return Rule(INERT, "TorchScript's unpickler builtin (restores lists and type tags)")
    if CALL in uses:
        enum = find_enum(module, name)
        if enum is not None:
            return Rule(INERT, enum)
        where = ("it is defined in the script that saved the file (__main__), so its source cannot be read"
                 if module == "__main__" else "it is not an Enum found in its module's source, nor on the data list")
        return Rule(UNSAFE, f"a callable the pickle calls ({opcode or 'REDUCE'}) that ftdoctor cannot show holds "
                            f"only data: {where}")
    if NEW in uses or STATE in uses:
        return Rule(INERT, "an instance restored from its state (cls.__new__, then BUILD), as pickle restores any "
                           "object: the class is not called with the file's arguments")
    return Rule(INERT, "named, never called")


def _unsafe_reason(module: str, name: str) -> str | None:
    head = name.split(".")[0]
    for key in ((module, name), (module, head)):
        if key in UNSAFE_NAMES:
            return f"{'.'.join(key)}: {UNSAFE_NAMES[key]}"
    dotted = f"{module}.{name}"
    for prefix, why in UNSAFE_MODULES.items():
        if module == prefix or module.startswith(prefix + ".") or dotted == prefix or dotted.startswith(prefix + "."):
            return f"{prefix}: {why}"
    return None


@lru_cache(maxsize=1)
def _weights_allowed() -> frozenset[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return frozenset(_get_allowed_globals())


# --- an Enum found in its module's source, read with ast, never imported ---------------------------------------

_ENUM_BASES = ("Enum", "Flag")
MAX_SOURCE_BYTES = 4 * 2**20


def find_enum(module: str, qualname: str) -> str | None:
    """Why ``module.qualname`` is an Enum (a sentence naming the source file and line), or None when its
    module's source cannot be found on the path, is not Python, or does not define it as one. The source is
    parsed, never imported or run; a class counts when a base's name ends in Enum or Flag (``enum.Enum``,
    ``IntEnum``, transformers' ``ExplicitEnum``), directly or through classes of the same module."""
    source = _module_source(module)
    if source is None:
        return None
    tree = _parse(source)
    if tree is None:
        return None
    node = _class_in(tree, qualname.split("."))
    if node is None or not _is_enum(node, tree, depth=0):
        return None
    return f"an Enum called with its value ({source.name}:{node.lineno}, read, not imported)"


def _module_source(module: str) -> Path | None:
    parts = module.split(".")
    if module == "__main__" or not all(p.isidentifier() for p in parts):
        return None
    for base in dict.fromkeys([os.getcwd(), *(p or os.getcwd() for p in sys.path)]):
        stem = Path(base).joinpath(*parts)
        for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
            try:
                if candidate.is_file() and candidate.stat().st_size <= MAX_SOURCE_BYTES:
                    return candidate
            except OSError:
                continue
    return None


@lru_cache(maxsize=64)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return None


def _class_in(scope: ast.AST, names: list[str]) -> ast.ClassDef | None:
    for node in getattr(scope, "body", []):
        if isinstance(node, ast.ClassDef) and node.name == names[0]:
            return node if len(names) == 1 else _class_in(node, names[1:])
    return None


def _base_name(base: ast.expr) -> str:
    if isinstance(base, ast.Name):
        return base.id
    if isinstance(base, ast.Attribute):
        return base.attr
    return ""


def _is_enum(node: ast.ClassDef, tree: ast.Module, depth: int) -> bool:
    for base in node.bases:
        name = _base_name(base)
        if name.endswith(_ENUM_BASES):
            return True
        local = _class_in(tree, [name]) if name and depth < 3 else None
        if local is not None and local is not node and _is_enum(local, tree, depth + 1):
            return True
    return False
