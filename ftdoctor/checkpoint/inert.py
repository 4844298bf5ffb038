"""Reading a training checkpoint whose extras name code, without running any of it; writing it back as it was.

A Lightning ``.ckpt`` (or any ``torch.save`` dict) often carries objects beside
its weights — a loss module or an OmegaConf container in ``hyper_parameters``,
an optimizer's state — that ``torch.load(weights_only=True)`` refuses, which
used to force ``--trust-checkpoint`` (running the file's code). Here the pickle
is read by an unpickler whose ``find_class`` returns the real object only for
the globals ``weights_only`` allows (tensors, storages, ``OrderedDict``, ...)
and, for every other global, an **inert placeholder**: a class made on the spot
that imports nothing and runs nothing. Constructing it (``REDUCE``, ``NEWOBJ``),
setting its state (``BUILD``) or filling it (``SETITEMS``, ``APPENDS``) only
records the arguments. Every pickle opcode that could call code goes through
``find_class``, so nothing from the file executes.

The placeholders remember how they were made, and :class:`Pickler` writes
them back the same way (the same global name, arguments, state and items), so
a checkpoint fixed by ftdoctor keeps every entry its framework wrote; only the
weights (and, with a new head, :mod:`.retarget`'s class counts) change.
"""
from __future__ import annotations

import _compat_pickle
import copyreg
import pickle
from typing import Any

_BUILTIN_SAFE = {("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "slice", "range")}


def _allowed() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return dict(_get_allowed_globals())


class Inert(dict):
    """An object of a class the file names but ftdoctor does not import: it only records how it was made."""

    _ftd_global: tuple[str, str] = ("", "")

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        self = super().__new__(cls)
        self._ftd_new = args            # NEWOBJ arguments (``cls.__new__(cls, *args)``)
        self._ftd_args = None           # REDUCE arguments (``cls(*args)``), set by __init__
        self._ftd_state = None
        self._ftd_items: list[Any] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:   # noqa: D107 - REDUCE: cls(*args)
        self._ftd_args = args
        self._ftd_new = ()

    def __setstate__(self, state: Any) -> None:
        self._ftd_state = state

    def append(self, item: Any) -> None:
        self._ftd_items.append(item)

    def extend(self, items: Any) -> None:
        self._ftd_items.extend(items)

    def __reduce_ex__(self, protocol: int) -> tuple:
        cls = type(self)
        dictitems = iter(dict.items(self)) if len(self) else None
        listitems = iter(self._ftd_items) if self._ftd_items else None
        if self._ftd_args is not None:
            return cls, tuple(self._ftd_args), self._ftd_state, listitems, dictitems
        return copyreg.__newobj__, (cls, *self._ftd_new), self._ftd_state, listitems, dictitems

    def __repr__(self) -> str:
        module, name = self._ftd_global
        return f"<inert {module}.{name}>"

    __hash__ = object.__hash__          # usable as a dict key or set member, as the original may have been


_CLASSES: dict[tuple[str, str], type] = {}


def placeholder(module: str, name: str) -> type:
    """The inert stand-in class for the global ``module.name`` (one per name)."""
    key = (module, name)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Inert[{module}.{name}]", (Inert,), {"_ftd_global": key})
    return _CLASSES[key]


def placeholders_in(obj: Any, limit: int = 100_000) -> list[str]:
    """The global names of the placeholders inside ``obj`` (dicts, lists, tuples, placeholder state)."""
    found: list[str] = []
    stack, seen = [obj], 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, Inert):
            name = ".".join(type(item)._ftd_global)
            if name not in found:
                found.append(name)
            stack.extend([item._ftd_state, item._ftd_args, item._ftd_new, item._ftd_items, *dict.values(item)])
        elif isinstance(item, type) and issubclass(item, Inert):
            name = ".".join(item._ftd_global)
            if name not in found:
                found.append(name)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return found


class Unpickler(pickle.Unpickler):
    """``find_class`` gives the real object only for what ``weights_only`` allows; a placeholder otherwise."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:     # protocol 2 writes Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed()
        key = f"{module}.{name}"
        if key in allowed:
            return allowed[key]
        if (module, name) in _BUILTIN_SAFE:
            return super().find_class(module, name)
        return placeholder(module, name)


class Pickler(pickle._Pickler):  # type: ignore[name-defined]  # the Python pickler: its save_global is ours
    """Writes a placeholder class back as the global it stood for (without importing it)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Inert) and obj._ftd_global != ("", ""):
            module, qualname = obj._ftd_global
            if self.proto >= 4:
                self.save(module)
                self.save(qualname)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + bytes(f"{module}\n{qualname}\n", "utf-8"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


class PickleModule:
    """What ``torch.load`` / ``torch.save`` take as ``pickle_module``."""

    Unpickler = Unpickler
    Pickler = Pickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:      # torch's legacy format reads its headers with it
        return Unpickler(file, **kwargs).load()

    @staticmethod
    def dump(obj: Any, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
        Pickler(file, protocol, **kwargs).dump(obj)
