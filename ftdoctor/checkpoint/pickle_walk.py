"""One pickle, walked opcode by opcode with a symbolic stack: which globals it names and what it does with each
(:mod:`.pickle_scan` walks every pickle of a checkpoint through it; the verdicts are :mod:`.pickle_rules`).

:func:`pickletools.genops` parses the opcodes (nothing is imported or called). ``GLOBAL`` / ``STACK_GLOBAL`` /
``INST`` name a global, ``REDUCE`` / ``INST`` / ``OBJ`` call it, ``NEWOBJ`` (or ``copyreg._reconstructor``)
makes an instance, ``BUILD`` / ``SETITEM`` / ``APPEND`` set state on an instance or on the global itself. Memo
reuse (``PUT`` / ``GET``) and names assembled on the stack are followed; a name ``STACK_GLOBAL`` cannot resolve
statically, an extension code (``EXT1/2/4``), a call of an object computed at load time, and a pickle damaged
before its ``STOP`` are unsafe findings: what a loader would do there cannot be known.
"""
from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field
from typing import Any, Callable

from ftdoctor.checkpoint import pickle_rules as rules
from ftdoctor.checkpoint.pickle_rules import CALL, MUTATE, NEW, REFERENCE, STATE, UNSAFE, Rule

#: how deep pickles inside pickles are followed
MAX_NESTING = 2


@dataclass(frozen=True)
class Finding:
    """One global a pickle names (or one thing that cannot be scanned), its kind and where it sits."""

    kind: str        # weights, inert or unsafe
    name: str        # the global, "posix.system"; or what could not be scanned
    reason: str
    opcode: str      # how the pickle applies it: REDUCE, INST, OBJ, NEWOBJ, BUILD, SETITEM, GLOBAL (named only)
    file: str        # the file, relative to a model folder ("" for a checkpoint file)
    pickle: str      # the pickle in it: "evil/data.pkl", "pickle 4 of 5" (legacy format), "" (a raw pickle)
    offset: int      # of that opcode, in the pickle
    count: int = 1   # how often the pickle names it
    damage: bool = False   # the pickle (or file) is damaged here: nothing beyond can be judged

    @property
    def where(self) -> str:
        """``evil/data.pkl at offset 1094`` (with the folder's file in front)."""
        inside = " of ".join(p for p in (self.pickle, self.file) if p)
        return f"{inside} at offset {self.offset}" if inside else f"offset {self.offset}"

    def describe(self) -> str:
        """``posix.system (REDUCE, evil/data.pkl at offset 1094)``."""
        return f"{self.name} ({self.opcode}, {self.where})"

    def to_json(self) -> dict[str, Any]:
        return {"global": self.name, "kind": self.kind, "reason": self.reason, "opcode": self.opcode,
                "file": self.file, "pickle": self.pickle, "offset": self.offset, "count": self.count}


class _Mark:
    __slots__ = ()


class _Other:
    __slots__ = ()


MARK, OTHER = _Mark(), _Other()


@dataclass(frozen=True)
class _Global:
    key: tuple[str, str]


@dataclass(frozen=True)
class _Instance:
    key: tuple[str, str]


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]


class _Damaged(Exception):
    def __init__(self, offset: int, what: str) -> None:
        super().__init__(what)
        self.offset = offset


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                      "STRING"})
_BYTES = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_RECONSTRUCTORS = frozenset({("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__")})
#: the use that names a global in a finding, strongest first
_RANK = (CALL, MUTATE, NEW, STATE, REFERENCE)


@dataclass
class _Use:
    opcode: str
    offset: int


@dataclass
class _Walk:
    """The symbolic run of one pickle: which globals it names and how it uses each."""

    file: str
    pickle: str
    depth: int = 0
    uses: dict[tuple[str, str], dict[str, _Use]] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    hazards: list[Finding] = field(default_factory=list)
    nested: list["_Walk"] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)     # the first few opcode arguments (the legacy magic)

    def run(self, stream: Any) -> None:
        stack: list[Any] = []
        memo: dict[Any, Any] = {}
        start = stream.tell()
        pos = start
        try:
            for op, arg, pos in pickletools.genops(stream):
                pos = (pos or 0) - start
                if len(self.values) < 4:
                    self.values.append(arg)
                self._step(op, arg, pos, stack, memo)
                if op.name == "STOP":
                    return
        except _Damaged:
            raise
        except Exception as exc:  # noqa: BLE001 - genops: unknown opcode, truncated argument, no STOP
            raise _Damaged(pos, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        raise _Damaged(pos, "the pickle ends before its STOP")

    # -- the opcodes -------------------------------------------------------------------------------------
    def _step(self, op: Any, arg: Any, pos: int, stack: list[Any], memo: dict[Any, Any]) -> None:
        name = op.name

        def pop() -> Any:
            if not stack or stack[-1] is MARK:
                raise _Damaged(pos, f"{name} on an empty stack")
            return stack.pop()

        def to_mark() -> list[Any]:
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is MARK:
                    items = stack[i + 1:]
                    del stack[i:]
                    return items
            raise _Damaged(pos, f"{name} without a MARK")

        if name in ("PROTO", "FRAME", "STOP"):
            return
        if name == "MARK":
            stack.append(MARK)
        elif name in _STRINGS:
            self._maybe_nested(arg, pos)
            stack.append(arg if isinstance(arg, str) and len(arg) <= 1024 else OTHER)
        elif name in _BYTES:
            self._maybe_nested(arg, pos)
            stack.append(OTHER)
        elif name == "GLOBAL" or name == "INST":
            module, _, qualname = str(arg).partition(" ")
            key = rules.normalise(module, qualname)
            if name == "GLOBAL":
                self._use(key, REFERENCE, name, pos)
                stack.append(_Global(key))
            else:
                to_mark()
                self._use(key, CALL, name, pos)
                stack.append(_Instance(key))
        elif name == "STACK_GLOBAL":
            qualname, module = pop(), pop()
            if isinstance(module, str) and isinstance(qualname, str):
                key = rules.normalise(module, qualname)
                self._use(key, REFERENCE, name, pos)
                stack.append(_Global(key))
            else:
                self._hazard("a name computed at load time", "STACK_GLOBAL imports a name the file does not spell "
                             "out (built on the stack), so what it imports cannot be known", name, pos)
                stack.append(OTHER)
        elif name == "REDUCE":
            args, func = pop(), pop()
            stack.append(self._call(func, args, name, pos))
        elif name == "OBJ":
            items = to_mark()
            stack.append(self._call(items[0] if items else OTHER, _Tuple(tuple(items[1:])), name, pos))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                pop()
            pop()
            cls = pop()
            stack.append(self._new(cls, name, pos))
        elif name == "BUILD":
            pop()
            self._touch(stack[-1] if stack else OTHER, name, pos)
        elif name in ("SETITEM", "APPEND"):
            pop()
            if name == "SETITEM":
                pop()
            self._touch(stack[-1] if stack else OTHER, name, pos)
        elif name in ("SETITEMS", "APPENDS", "ADDITEMS"):
            to_mark()
            self._touch(stack[-1] if stack else OTHER, name, pos)
        elif name == "TUPLE":
            stack.append(_Tuple(tuple(to_mark())))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [pop() for _ in range(n)][::-1]
            stack.append(_Tuple(tuple(items)))
        elif name == "EMPTY_TUPLE":
            stack.append(_Tuple(()))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else OTHER
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else OTHER
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _Damaged(pos, f"{name} {arg} reads a memo entry never written")
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1] if stack else OTHER)
        elif name == "POP":
            if stack:
                stack.pop()
        elif name == "POP_MARK":
            to_mark()
        elif name in ("EXT1", "EXT2", "EXT4"):
            self._hazard(f"extension code {arg}", f"{name} names a global through copyreg's extension registry, "
                         "which the file does not spell out", name, pos)
            stack.append(OTHER)
        else:
            self._generic(op, stack, to_mark, pop)

    @staticmethod
    def _generic(op: Any, stack: list[Any], to_mark: Callable[[], list[Any]], pop: Callable[[], Any]) -> None:
        """Any other opcode by its declared stack effect (numbers, None, lists, dicts, persistent ids)."""
        before = list(op.stack_before)
        if pickletools.markobject in before:
            to_mark()
            before = before[before.index(pickletools.markobject) + 2:]
        for _ in before:
            pop()
        stack.extend(OTHER for _ in op.stack_after)

    def _call(self, func: Any, args: Any, opcode: str, pos: int) -> Any:
        if isinstance(func, _Global):
            if func.key in _RECONSTRUCTORS and isinstance(args, _Tuple) and args.items \
                    and isinstance(args.items[0], _Global):
                self._use(func.key, CALL, opcode, pos)
                return self._new(args.items[0], opcode, pos)
            self._use(func.key, CALL, opcode, pos)
            return _Instance(func.key)
        self._hazard("a call of a computed object", f"{opcode} calls an object made at load time rather than a "
                     "named global, so what it calls cannot be known", opcode, pos)
        return OTHER

    def _new(self, cls: Any, opcode: str, pos: int) -> Any:
        if isinstance(cls, _Global):
            self._use(cls.key, NEW, opcode, pos)
            return _Instance(cls.key)
        self._hazard("an instance of a computed class", f"{opcode} makes an object of a class made at load time, "
                     "so what it makes cannot be known", opcode, pos)
        return OTHER

    def _touch(self, target: Any, opcode: str, pos: int) -> None:
        if isinstance(target, _Global):
            self._use(target.key, MUTATE, opcode, pos)
        elif isinstance(target, _Instance):
            self._use(target.key, STATE, opcode, pos)

    def _use(self, key: tuple[str, str], use: str, opcode: str, pos: int) -> None:
        seen = self.uses.setdefault(key, {})
        if use not in seen:
            seen[use] = _Use(opcode, pos)
        if use == REFERENCE:
            self.counts[key] = self.counts.get(key, 0) + 1

    def _hazard(self, what: str, reason: str, opcode: str, pos: int) -> None:
        self.hazards.append(Finding(UNSAFE, what, reason, opcode, self.file, self.pickle, pos))

    def _maybe_nested(self, value: Any, pos: int) -> None:
        """A bytes value (or protocol 2's latin-1 text for bytes) that is itself a pickle of protocol 2 to 5."""
        if self.depth >= MAX_NESTING or not isinstance(value, (bytes, bytearray, str)) or len(value) < 4:
            return
        if isinstance(value, str):
            if value[0] != "\x80" or max(map(ord, value[:64])) > 255:
                return
            try:
                value = value.encode("latin1")
            except UnicodeEncodeError:
                return
        if value[0] != 0x80 or not 2 <= value[1] <= 5:
            return
        inner = _Walk(self.file, f"a pickle inside {self.pickle or 'the pickle'} (bytes at offset {pos})",
                      self.depth + 1)
        try:
            inner.run(io.BytesIO(bytes(value)))
        except _Damaged:
            return                      # raw bytes that only start like a pickle: data, not a pickle
        self.nested.append(inner)

    # -- the verdicts ------------------------------------------------------------------------------------
    def findings(self, special: Callable[[str, str], Rule | None]) -> list[Finding]:
        out = list(self.hazards)
        for key, uses in self.uses.items():
            use = next(u for u in _RANK if u in uses)
            at = uses[use]
            call = uses.get(CALL)
            rule = special(*key) or rules.classify(*key, uses, opcode=call.opcode if call else "")
            out.append(Finding(rule.kind, ".".join(key), rule.reason, at.opcode, self.file, self.pickle, at.offset,
                               max(1, self.counts.get(key, 0))))
        for inner in self.nested:
            out.extend(inner.findings(special))
        return out


def walk(stream: Any, file: str, pickle: str, special: Callable[[str, str], Rule | None],
          findings: list[Finding]) -> _Walk | None:
    """Walk one pickle from the stream's position into ``findings``; None (and an unsafe finding) if damaged."""
    walk = _Walk(file, pickle)
    try:
        walk.run(stream)
    except _Damaged as exc:
        findings.extend(walk.findings(special))
        findings.append(Finding(UNSAFE, "a damaged pickle", f"cannot be read past this point ({exc}): what a loader "
                                "does beyond it cannot be known", "?", file, pickle, exc.offset, damage=True))
        return None
    findings.extend(walk.findings(special))
    return walk


def no_special(module: str, name: str) -> Rule | None:
    return None
