"""Judgement: one rule per probe, used by its findings and by ``ftdoctor check`` alike (SPEC §1.6, §4).

A probe's :meth:`~ftdoctor.probes.base.Probe.judge` compares its figures with
the thresholds and returns :class:`Verdict` s — one per threshold key it owns.
``check`` turns each into a check row; the probe report turns the failed ones
into findings. A verdict's :class:`Suggestion` is a command as data (``fix
--method rescale``); :func:`render` writes it out with the run's own model,
architecture and data (:class:`RunArgs`), so what ftdoctor prints runs as printed.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Suggestion:
    """What to do about a finding. ``command`` ``"fix"`` or ``"trace"`` is a command line (``args`` after the
    model; ``--data DATA`` and, for ``fix``, ``-o FIXED.pt`` added); None is advice in words (``before``).
    ``before`` / ``after`` are words around the command."""

    command: str | None = None
    args: tuple[str, ...] = ()
    before: str = ""
    after: str = ""
    data: bool = True


@dataclass(frozen=True)
class RunArgs:
    """The arguments a suggested command repeats from the run that suggested it."""

    model: str = "MODEL"
    arch: str | None = None
    data: str = "DATA"
    new_head: bool = False


PLACEHOLDERS = RunArgs()


def render(s: Suggestion | None, run: RunArgs = PLACEHOLDERS, *, words: bool = True) -> str | None:
    """``s`` as the text users see: the command with this run's model, ``--arch`` and data filled in
    (``words=False``: the command alone)."""
    if s is None:
        return None
    if s.command is None:
        return s.before
    model = run.model if run is PLACEHOLDERS else shlex.quote(run.model)
    parts = ["ftdoctor", s.command, model]
    if run.arch:
        parts += ["--arch", shlex.quote(run.arch)]
    parts += list(s.args)
    if s.data and s.command in ("fix", "trace"):
        parts += ["--data", run.data if run is PLACEHOLDERS else shlex.quote(run.data)]
    if s.command == "fix":
        if run.new_head:
            parts.append("--new-head")
        parts += ["-o", "FIXED.pt"]
    text = " ".join(parts)
    return f"{s.before}{text}{s.after}" if words else text


@dataclass(frozen=True)
class Verdict:
    """One figure against one threshold. ``passed`` None: nothing to judge (e.g. no error energy at all).

    ``message`` reads "what value (where) op threshold", ``explanation`` why it matters (with the paper),
    ``praise`` what a passed verdict may say as an info finding.
    """

    key: str
    passed: bool | None
    value: float | None
    threshold: float | None
    message: str
    explanation: str = ""
    suggestion: Suggestion | None = None
    severity: str = "warning"
    praise: str = ""
    details: tuple[str, ...] = field(default_factory=tuple)


def fmt(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4g}"


def bound(key: str, value: float | None, threshold: float, what: str, *, where: str = "", explanation: str = "",
          suggestion: Suggestion | None = None, severity: str = "warning", praise: str = "") -> Verdict:
    """``value`` against a ``max_*`` / ``min_*`` threshold; a value that could not be measured fails."""
    if value is None or not math.isfinite(value):
        return Verdict(key, False, None, threshold, f"{what} could not be measured{where}",
                       severity=severity)
    upper = key.startswith("max_")
    ok = value <= threshold if upper else value >= threshold
    op = ("<=" if ok else ">") if upper else (">=" if ok else "<")
    return Verdict(key, ok, float(value), threshold, f"{what} {fmt(value)}{where} {op} {threshold:g}",
                   explanation, suggestion, severity, praise)


def check_message(v: Verdict, run: RunArgs = PLACEHOLDERS) -> str:
    """A verdict as one line of ``ftdoctor check``: the comparison, and for a failure why and what to try."""
    if v.passed is not False:
        return v.message
    hint = v.explanation
    command = render(v.suggestion, run, words=False)
    if command and v.suggestion is not None and v.suggestion.command:
        hint += f"; try `{command}`" if hint else f"try `{command}`"
    return f"{v.message}: {hint}" if hint else v.message
