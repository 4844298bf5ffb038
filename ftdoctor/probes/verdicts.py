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
from typing import Any


@dataclass(frozen=True)
class Suggestion:
    """What to do about a finding. ``command`` (``"fix"``, ``"trace"``, ``"inspect"``) is a command line: ``args``
    follow the model and its flags; ``fix`` and ``trace`` get ``--data`` and its flags, ``fix`` also
    ``-o FIXED.pt`` (``-o FIXED`` for a model folder). None is advice in words (``before``). ``before`` / ``after`` are words around the command;
    ``also`` a second suggestion printed after it."""

    command: str | None = None
    args: tuple[str, ...] = ()
    before: str = ""
    after: str = ""
    data: bool = True
    also: "Suggestion | None" = None


@dataclass(frozen=True)
class RunArgs:
    """What a suggested command repeats from the run that suggested it, so that it runs as printed: the model
    and its flags (``--arch``, ``--trust-checkpoint``, ...), the data and its flags (``--max-samples``,
    ``--normalize``, ...), and ``--new-head``."""

    model: str = "MODEL"
    model_flags: tuple[str, ...] = ()
    data: str = "DATA"
    data_flags: tuple[str, ...] = ()
    new_head: bool = False
    out: str = "FIXED.pt"           # a model folder is fixed into a folder: FIXED

    @classmethod
    def of(cls, model: str | Any, model_opts: Any = None, data_opts: Any = None, new_head: bool = False) -> "RunArgs":
        """From the path and the options of a run (``ModelOptions``, ``DataOptions``; None: not given)."""
        return cls(str(model), model_opts.flags() if model_opts is not None else (),
                   data_opts.data if data_opts is not None else "DATA",
                   data_opts.flags() if data_opts is not None else (), new_head,
                   _fixed_name(str(model)))


def _fixed_name(model: str) -> str:
    """Where a suggested fix writes: ``FIXED.pt`` (``FIXED`` for a model folder, ``FIXED.onnx`` for an ONNX
    file), never the model's own name."""
    from pathlib import Path

    from ftdoctor.checkpoint.folder import output_is_folder

    name = "FIXED" if output_is_folder(model) else "FIXED.onnx" if model.lower().endswith(".onnx") else "FIXED.pt"
    taken = {Path(model).name, Path(model).parent.name}
    return name if name not in taken else name.replace("FIXED", "FIXED-2")


PLACEHOLDERS = RunArgs()


def render(s: Suggestion | None, run: RunArgs = PLACEHOLDERS, *, words: bool = True) -> str | None:
    """``s`` as the text users see: the command with this run's model, data and their flags filled in
    (``words=False``: the command alone)."""
    if s is None:
        return None
    if s.command is None:
        return s.before
    quote = (lambda v: v) if run is PLACEHOLDERS else shlex.quote
    parts = ["ftdoctor", s.command, quote(run.model), *map(quote, run.model_flags), *s.args]
    if s.data and s.command in ("fix", "trace"):
        parts += ["--data", quote(run.data), *map(quote, run.data_flags)]
    if s.command == "fix":
        if run.new_head:
            parts.append("--new-head")
        parts += ["-o", run.out]
    text = " ".join(parts)
    if not words:
        return text
    also = f"  ({render(s.also, run)})" if s.also is not None else ""
    return f"{s.before}{text}{s.after}{also}"


def rescale_unavailable(ctx: Any) -> str | None:
    """Why ``fix --method rescale`` cannot help the probed model (a :class:`~ftdoctor.probes.base.ProbeContext`),
    or None."""
    from ftdoctor.fixes.scale_graph import rescale_blocker

    return rescale_blocker(ctx.model, ctx.layers, ctx.head)


def rescale_suggestion(blocker: str | None) -> Suggestion:
    """``fix --method rescale``, or in words why it cannot help this model (``blocker``, from
    :func:`ftdoctor.fixes.scale_graph.rescale_blocker` via the probe's figures)."""
    if blocker is None:
        return Suggestion("fix", ("--method", "rescale"))
    return Suggestion(before=f"fix --method rescale cannot equalise this model's rates: {blocker}")


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
    elif v.suggestion is not None and v.suggestion.command is None and v.suggestion.before:
        hint += f"; {v.suggestion.before}" if hint else v.suggestion.before
    return f"{v.message}: {hint}" if hint else v.message
