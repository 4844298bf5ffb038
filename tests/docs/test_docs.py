"""The documentation: the site builds with no broken link or anchor, every runnable example exits and prints
as its page shows, the docs' Python examples run, and the README stays a short front door."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


EXAMPLES = _load("docs_examples", ROOT / "scripts" / "docs_examples.py")
RUNNABLE = [p for p in EXAMPLES.pages() if any(b.kind == "run" for b in EXAMPLES.parse(p))]


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-cache")


def test_there_are_runnable_examples_on_the_pages_that_promise_them():
    names = {str(p.relative_to(ROOT)) for p in RUNNABLE}
    assert {"README.md", "docs/commands/probe.md", "docs/commands/fix.md", "docs/commands/check.md",
            "docs/ci.md", "docs/security.md"} <= names


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_examples_exit_and_print_as_the_page_shows(page, docs_cache):
    results = EXAMPLES.run_page(page, docs_cache)
    problems = [problem for r in results for problem in r.problems]
    digits = EXAMPLES.written_on(page) == EXAMPLES.machine()     # elsewhere: the words, numbers masked
    diffs = [d for r in results if (d := EXAMPLES.differences(r, digits))]
    assert not problems and not diffs, ("\n".join(problems + diffs)
                                        + "\n(if the change is meant: python scripts/docs_examples.py rewrites the page)")


def test_excerpts_keep_what_they_name_and_mark_each_cut():
    lines = ["a", "╭─ summary", "│ x", "╰──", "b", "c", "1 → fix"]
    assert EXAMPLES.excerpt(lines, ["╭─ summary..^╰", r"^\d+ →"]) == ["…", "╭─ summary", "│ x", "╰──", "…", "1 → fix"]
    assert EXAMPLES.excerpt(lines, []) == lines


def test_off_the_machine_that_wrote_a_page_its_words_are_compared_and_its_numbers_masked():
    page = ["│ noise fraction ζ/φ (ENTAME)      0.63 = uniform part (1/C)/φ 0.165 + excess    │",
            "│ depth ratio (RIFLE)   0.989 │", "━━━━╇━━━━", "wrote FIXED.pt (state_dict, sha256 26405c1a7a8b…)"]
    other_cpu = ["│ noise fraction ζ/φ (ENTAME)      0.666 = uniform part (1/C)/φ 0.17 + excess  │",
                 "│ depth ratio (RIFLE)   0.683       │", "━━━━━━╇━━━━", "wrote FIXED.pt (state_dict, sha256 957b03ce6b26…)"]
    assert EXAMPLES.words(page) == EXAMPLES.words(other_cpu)
    assert EXAMPLES.words(page) != EXAMPLES.words([*other_cpu[:3], "wrote FIXED.pt (pickle, sha256 957b03ce6b26…)"])
    assert EXAMPLES.words(["1 warning [noise]"]) != EXAMPLES.words(["2 warnings [noise]"])


def test_an_echo_line_sets_the_exit_the_command_before_it_must_have(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- run -->\n```console\n$ false\n$ echo $?\n1\n$ true\n```\n", encoding="utf-8")
    [block] = EXAMPLES.parse(page)
    assert EXAMPLES.expected_exits(block) == [1, 0, 0]


def _python_examples() -> list[tuple[str, str]]:
    found = []
    for page in EXAMPLES.pages():
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", text, re.S):
            found.append((f"{page.relative_to(ROOT)}:{m.group(1)}", m.group(2)))
    return found


@pytest.mark.parametrize("name,code", [e for e in _python_examples() if e[0].endswith(":library")],
                         ids=lambda v: v if ":" in str(v) else "")
def test_the_python_api_example_runs(name, code, capsys):
    exec(compile(code, name, "exec"), {"__name__": "docs_example"})
    assert "noise fraction" in capsys.readouterr().out


def test_mkdocs_builds_strictly_with_search_pictures_and_the_generated_cli_reference(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (site / "search" / "search_index.json").is_file()
    for picture in ("report-page.png", "ppocr-compare.png", "compare-page.png"):
        assert (site / picture).is_file()
    reference = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    hooks = _load("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    for name in hooks.commands():
        assert f'id="ftdoctor-{name}"' in reference
    # the reference is the --help of the installed code, option by option
    assert "--max-noise-fraction" in reference and "--trust-checkpoint" in reference
    architecture = (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert "Bird" in architecture           # ARCHITECTURE.md, included whole


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").split("\n")
    assert len(lines) <= 150
    assert lines[2:6] == [
        "```bash",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[plot]' && ftdoctor demo",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest",
        "```"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert lines[4] in ci


def test_every_relative_link_of_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_the_readme_says_nothing_the_site_does_not():
    """The README's tour is included into Getting started, its table of what ftdoctor reads is on the home page."""
    site_text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    readme = README.read_text(encoding="utf-8")
    assert '--8<-- "README.md:tour"' in site_text and "[start:tour]" in readme
    table = readme[readme.index("## What it reads"):readme.index("## Documentation")]
    assert table.strip() in site_text
