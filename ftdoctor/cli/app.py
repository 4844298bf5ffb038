"""The typer application, the global flags, the terminal helpers, and the edge where errors become exit codes.

:func:`main` turns an :class:`~ftdoctor.errors.FtdoctorError` into two lines on
stderr (cause and remedy) and its exit code, with no traceback unless
``--debug``; Ctrl-C and SIGTERM say truthfully what was kept (130, 143).
"""
from __future__ import annotations

import os
import importlib
import sys
from typing import Annotated, Any

import typer

from ftdoctor import __version__
from ftdoctor.allocator import keep_freed_memory
from ftdoctor.errors import FtdoctorError

app = typer.Typer(
    name="ftdoctor",
    help="Diagnose and repair the dynamics of fine-tuning a pretrained classifier.\n\n"
         "Measurements from four papers — ENTAME (noise at the head), Krähenbühl et al. (change rates), "
         "RIFLE (gradient norms) and L2-SP (R² and drift) — on your checkpoint and data, and fixes "
         "that write a repaired checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",   # docstrings wrap like paragraphs; `[plot]` is not taken for markup
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def docs_page(command: str) -> str:
    """The line every command's ``--help`` ends with: where its page of the documentation site is."""
    return (f"More, with real output: docs/commands/{command}.md; the whole documentation site, from a clone: "
            "pip install -e '.[docs]' && mkdocs serve")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=lambda value: _print_version(value))] = False,
) -> None:
    _state["debug"] = debug


def _print_version(value: bool) -> None:
    """``ftdoctor --version``: eager, so it answers before a command is asked for."""
    if value:
        typer.echo(f"ftdoctor {__version__}")
        raise typer.Exit(0)


def _plain_flags(command) -> None:
    """Flags take no value: show no ``<bool>`` type next to them in ``--help`` (typer's default does)."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    make_help = command.get_help_option       # --help is made per call, not kept in params

    def help_option(ctx, _make=make_help):
        option = _make(ctx)
        if option is not None:
            option.metavar = ""
        return option
    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


def console(stderr: bool = False):
    """A rich console; when the stream is not a terminal, wide enough that tables are not squeezed."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, width=width)


def print_page_written(path: Any, quiet: bool) -> None:
    """Where ``--html`` put the page (on stderr, so that stdout stays the report)."""
    if path is not None and not quiet:
        from rich.markup import escape
        console(stderr=True).print(f"page written to {escape(str(path))} (open it in a browser)", soft_wrap=True)


def print_notes(notes: list[str], quiet: bool) -> None:
    if quiet:
        return
    err = console(stderr=True)
    for n in notes:
        err.print(f"[dim]note: {n}[/]")


def output_format(name: str, kind: str):
    """The registered output format ``name`` for ``kind`` results (checked before any work)."""
    from ftdoctor.report import get, load_formats
    load_formats()
    return get(name, kind)


def _fail(cause: str, remedy: str, code: int) -> None:
    from rich.markup import escape
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {escape(cause)}", soft_wrap=True)
    err.print(f"[bold]hint:[/] {escape(remedy)}", soft_wrap=True)
    sys.exit(code)


def _interrupted(exc: BaseException) -> None:
    """Ctrl-C or SIGTERM: say truthfully what was kept (outputs are rolled back unless already complete)."""
    import signal

    from ftdoctor.outputs import Terminated, committed, received_signal
    kept = committed()
    # typer hands Ctrl-C back as the value 130: the signal handler remembers which signal it was
    term = isinstance(exc, Terminated) or received_signal() == signal.SIGTERM
    signame, code = ("SIGTERM", 143) if term else ("Ctrl-C", 130)
    if kept:
        _fail(f"interrupted ({signame}) after the outputs were complete: {', '.join(map(str, kept))}",
              "they are whole; nothing else was written", code)
    _fail(f"interrupted ({signame})", "nothing was written; run the command again", code)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(UsageError classes, ClickException classes) of the click typer runs on: typer >= 0.2x vendors its own
    (``typer._click``), and a separately installed ``click`` (another package's dependency) has other classes."""
    usage: list[type] = []
    errors: list[type] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(module.UsageError)
        errors.append(module.ClickException)
    return tuple(usage), tuple(errors)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app on ``argv`` (default ``sys.argv[1:]``), map errors to SPEC exit codes."""
    keep_freed_memory()   # large per-batch tensors reused without page faults (glibc; see allocator.py)
    from ftdoctor.outputs import start_command
    start_command()   # SIGTERM unwinds like Ctrl-C: partial outputs are rolled back
    _state["debug"] = False
    try:
        from ftdoctor.registry import load_plugins
        load_plugins()   # plug-ins of installed packages register before the arguments are read
        command = typer.main.get_command(app)
        _plain_flags(command)
        code = command(args=argv, standalone_mode=False)
        if code == 130:  # without standalone mode typer returns Ctrl-C as the value 130 instead of raising
            _interrupted(KeyboardInterrupt())
        if isinstance(code, int) and code:
            sys.exit(code)
    except FtdoctorError as exc:
        if _state["debug"]:
            raise
        _fail(exc.cause, exc.remedy, exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _interrupted(KeyboardInterrupt())
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # click usage errors and anything unforeseen
        usage, click_errors = _click_exception_types()
        if isinstance(exc, usage):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _fail(f"unexpected {type(exc).__name__}: {first}",
              "rerun with --debug for the traceback and report it if the input looks valid", 2)
    sys.exit(0)
