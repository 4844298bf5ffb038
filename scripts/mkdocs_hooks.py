"""MkDocs hooks: the CLI reference page is generated from the typer application at build time.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, one section per ``ftdoctor``
command with that command's ``--help`` exactly as the terminal prints it at 100 columns, so the
reference cannot drift from the code.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"


def help_text(args: list[str], columns: int = 100) -> str:
    """``ftdoctor ARGS --help`` exactly as a user's terminal gets it at ``columns`` (a subprocess, no colour)."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"}
    exe = Path(sys.executable).with_name("ftdoctor")       # the console script, so usage says `ftdoctor`
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ftdoctor"]
    proc = subprocess.run([*cmd, *args, "--help"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"ftdoctor {' '.join(args)} --help exited {proc.returncode}: {proc.stderr}")
    return "\n".join(line.rstrip() for line in proc.stdout.split("\n")).strip("\n")


def commands() -> list[str]:
    import typer

    from ftdoctor.cli import app
    return list(typer.main.get_command(app).commands)


def reference() -> str:
    parts = ["## ftdoctor", "", "```text", help_text([]), "```", ""]
    for name in commands():
        parts += [f"## ftdoctor {name}", "", "```text", help_text([name]), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
