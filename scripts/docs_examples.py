"""Run the shell examples of README.md and docs/ and write their real output back into the pages.

A fenced block preceded by a marker comment is an example::

    <!-- run: setup=source cols=100 keep='╭─ summary..^╰' keep='^\\d+ →' -->
    ```console
    $ ftdoctor probe source.pt --arch ftdoctor.zoo:ShapesNet --data shapes:5 --new-head
    (output, written by this script)
    $ echo $?
    0
    ```

* ``<!-- run -->`` blocks are *runnable*: ``tests/docs/test_examples.py`` runs every one of them and fails
  when a command exits otherwise than the page shows (0 unless an ``echo $?`` line says another code) or
  prints something other than the page shows.
* ``<!-- output -->`` blocks take minutes to hours (benchmarks, long fine-tunes): only
  ``python scripts/docs_examples.py --slow`` reruns them; the tests do not.

Options (shell words inside the marker): ``setup=A,B`` puts fixtures into the page's work directory
(:data:`SETUPS`); ``cols=N`` sets ``COLUMNS`` (default 100); ``keep=REGEX`` keeps the output lines that
match, ``keep=START..END`` the lines from one matching START to the next matching END, each run of left-out
lines shown as one ``…``; ``cwd=root`` runs in the project root instead of the work directory;
``output=none`` shows the commands alone; ``cut=N`` cuts lines after N characters (`` …``). Every block of a page runs in order in one fresh work directory,
whose path is written as ``.`` in the output. Commands run with ``bash -c``, ``ftdoctor`` and ``python``
from this interpreter's environment.

Figures of a fine-tune depend on the CPU (its floating-point paths): ``scripts/docs_examples_machines.json``
records the machine each page was written on, and a page is compared digit for digit only there, elsewhere
word for word with its numbers masked (:func:`words`).

Usage::

    python scripts/docs_examples.py            # rerun every runnable block, rewrite what changed
    python scripts/docs_examples.py --check    # rerun, change nothing, exit 1 on any difference
    python scripts/docs_examples.py --slow docs/performance.md   # also the slow blocks of one page
    python scripts/docs_examples.py --slow --only monitor.py docs/performance.md   # only those slow blocks
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- (run|output)(?::(.*?))? -->$")
ELLIPSIS = "…"


@dataclass
class Command:
    text: list[str]                 # the command as the page writes it (continuation lines included)
    output: list[str] = field(default_factory=list)

    @property
    def shell(self) -> str:
        return "\n".join(self.text)[2:]


@dataclass
class Block:
    page: Path
    kind: str                        # "run" or "output"
    options: dict
    start: int                       # index of the first line inside the fence
    end: int                         # index of the closing fence
    commands: list[Command]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.start}"


def _options(text: str | None) -> dict:
    opts: dict = {"keep": []}
    for word in shlex.split(text or ""):
        key, _, value = word.partition("=")
        if key == "keep":
            opts["keep"].append(value)
        else:
            opts[key] = value
    return opts


def parse(page: Path) -> list[Block]:
    """The example blocks of one page, in order."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks = []
    i = 0
    fenced = False                  # a marker shown inside a code block is an example of one, not one
    while i < len(lines):
        m = None if fenced else MARK.match(lines[i].strip())
        if not m:
            if lines[i].lstrip().startswith("```"):
                fenced = not fenced
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise SystemExit(f"{page}:{i + 1}: an example marker must stand right above a fenced block")
        start = i + 2
        end = next((j for j in range(start, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise SystemExit(f"{page}:{i + 1}: the fenced block never closes")
        commands: list[Command] = []
        j = start
        while j < end:
            line = lines[j]
            if line.startswith("$ "):
                text = [line]
                while text[-1].endswith("\\") and j + 1 < end:
                    j += 1
                    text.append(lines[j])
                commands.append(Command(text))
            elif commands:
                commands[-1].output.append(line)
            j += 1
        if not commands:
            raise SystemExit(f"{page}:{i + 1}: an example block holds no '$ ' command")
        blocks.append(Block(page, m.group(1), _options(m.group(2)), start, end, commands))
        i = end + 1
    return blocks


def expected_exits(block: Block) -> list[int]:
    """What each command must exit with: 0, or the number an ``echo $?`` right after it shows."""
    codes = []
    for k, cmd in enumerate(block.commands):
        nxt = block.commands[k + 1] if k + 1 < len(block.commands) else None
        if nxt is not None and nxt.shell.strip() == "echo $?" and nxt.output and nxt.output[0].strip().isdigit():
            codes.append(int(nxt.output[0]))
        else:
            codes.append(0)
    return codes


# -- fixtures --------------------------------------------------------------------------------------
def _source(work: Path, cache: Path) -> None:
    """source.pt: the demo's ShapesNet pretrained on shapes (ten classes); trained once per cache."""
    cached = cache / "source.pt"
    if not cached.exists():
        from ftdoctor.demo import pretrain_source
        pretrain_source(cache)
    shutil.copy(cached, work / "source.pt")


def _exports(work: Path, cache: Path) -> None:
    """exports/ (v1 the source model, v2 with one NaN weight, v3 v1 cut in half) and a pyproject.toml."""
    import torch
    _source(work, cache)
    exports = work / "exports"
    exports.mkdir(exist_ok=True)
    shutil.copy(work / "source.pt", exports / "shapesnet-v1.pt")
    state = torch.load(work / "source.pt", weights_only=True)
    state["features.4.weight"].view(-1)[7] = float("nan")
    torch.save(state, exports / "shapesnet-v2.pt")
    data = (work / "source.pt").read_bytes()
    (exports / "shapesnet-v3.pt").write_bytes(data[: len(data) // 2])
    (work / "source.pt").unlink()
    (work / "pyproject.toml").write_text(EXPORTS_CONFIG, encoding="utf-8")


EXPORTS_CONFIG = """[tool.ftdoctor.check]
expect_num_classes = 10
max_noise_fraction = "2x"          # defaults: "2x" (twice the floor 1/(C-1))
max_excess_noise_fraction = 0.3    # 0.05
min_depth_ratio = 0.01             # 0.01
# max_change_rate_spread = 10, max_change_rate_cv = 5, min_r2_median = 0.5,
# max_drift_rel = 0.5, require_finite = true
"""


class _Payload:
    """Pickles as a call of os.system: what a malicious checkpoint holds (it is never loaded here)."""

    def __reduce__(self):
        return (os.system, ("echo this would have run",))


def _evil(work: Path, cache: Path) -> None:
    """evil.pt (a state dict beside an object whose __reduce__ is os.system) and good.pt (a resnet18)."""
    import torch
    import torchvision
    torch.manual_seed(0)
    good = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(good, work / "good.pt")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": _Payload()}, work / "evil.pt")


def _bert(work: Path, cache: Path) -> None:
    """bert-sentiment/ (a tiny random BERT with two labels and its tokenizer) and reviews.csv (three labels)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import csv
    from hf_helpers import SENTENCES, SENTIMENT, bert_folder
    bert_folder(work / "bert-sentiment", labels=["neg", "pos"])
    with open(work / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for k, (text, label) in enumerate(zip(SENTENCES * 5, SENTIMENT * 5)):
            writer.writerow([text, "neutral" if k % 3 == 2 else label])


def _convnext(work: Path, cache: Path) -> None:
    """convnext-atto/: a timm hub folder with random weights."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_helpers import timm_folder
    timm_folder(work / "convnext-atto", name="convnext_atto", num_classes=10)


def _ppocr(work: Path, cache: Path) -> None:
    """cls.onnx: PP-OCR's text-direction classifier, as the rapidocr-onnxruntime package ships it."""
    import importlib.util
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("setup=ppocr needs rapidocr-onnxruntime: pip install -e '.[test]'")
    model = Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    shutil.copy(model, work / "cls.onnx")


def _examples(work: Path, cache: Path) -> None:
    """examples/: the repository's runnable examples, as a clone has them."""
    shutil.copytree(ROOT / "examples", work / "examples", dirs_exist_ok=True)


def _stripes(work: Path, cache: Path) -> None:
    """The plug-in package of docs/extending.md, installed into ``site-packages/`` of the work directory
    (its module and the dist-info naming its entry point, as ``pip install`` leaves them), and ``model.pt``
    (a resnet18's state dict with three outputs)."""
    import torch
    import torchvision
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- example: stripes -->\n```python\n(.*?)```", text, re.S).group(1)
    site = work / "site-packages"
    info = site / "my_plugins-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (site / "my_plugins.py").write_text(code, encoding="utf-8")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugins\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text('[ftdoctor.plugins]\nstripes = my_plugins\n', encoding="utf-8")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), work / "model.pt")


SETUPS = {"stripes": _stripes, "examples": _examples, "source": _source, "exports": _exports, "evil": _evil, "bert": _bert, "convnext": _convnext,
          "ppocr": _ppocr}


# -- running ---------------------------------------------------------------------------------------
def _env(cols: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = cols
    env.pop("GITHUB_ACTIONS", None)           # check would choose its GitHub format by itself
    env.pop("FORCE_COLOR", None)
    env["NO_COLOR"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def excerpt(lines: list[str], keep: list[str]) -> list[str]:
    """The lines ``keep`` selects; each run of left-out lines becomes one ``…`` line."""
    if not keep:
        return lines
    chosen = [False] * len(lines)
    for spec in keep:
        start, sep, stop = spec.partition("..")
        i = 0
        while i < len(lines):
            if re.search(start, lines[i]):
                chosen[i] = True
                if sep:
                    j = i + 1
                    while j < len(lines) and not re.search(stop, lines[j]):
                        chosen[j] = True
                        j += 1
                    if j < len(lines):
                        chosen[j] = True
                    i = j
            i += 1
    out: list[str] = []
    for line, keep_it in zip(lines, chosen):
        if keep_it:
            out.append(line)
        elif not out or out[-1] != ELLIPSIS:
            out.append(ELLIPSIS)
    return out


@dataclass
class Result:
    block: Block
    lines: list[str]                 # the new inside of the fence
    exits: list[int]
    problems: list[str]


def run_block(block: Block, work: Path, cache: Path) -> Result:
    for name in filter(None, block.options.get("setup", "").split(",")):
        if name not in SETUPS:
            raise SystemExit(f"{block.where}: unknown setup {name!r} (known: {', '.join(SETUPS)})")
        SETUPS[name](work, cache)
    cwd = ROOT if block.options.get("cwd") == "root" else work
    env = _env(block.options.get("cols", "100"))
    if (work / "site-packages").is_dir():           # what a setup installed, as pip would
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "site-packages"), env.get("PYTHONPATH")]))
    lines: list[str] = []
    exits: list[int] = []
    last = 0
    for cmd in block.commands:
        if cmd.shell.strip() == "echo $?":
            output = [str(last)]
        else:
            proc = subprocess.run(["bash", "-c", cmd.shell], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=int(block.options.get("timeout", 3600)))
            last = proc.returncode
            exits.append(last)
            text = proc.stdout.replace(f"{work}/", "").replace(str(work), ".")
            output = [line.rstrip() for line in text.rstrip("\n").split("\n")] if text.strip() else []
            output = excerpt(output, block.options["keep"])
            if "cut" in block.options:
                width = int(block.options["cut"])
                output = [line if len(line) <= width else line[:width] + " " + ELLIPSIS for line in output]
        lines += cmd.text
        if block.options.get("output") != "none":
            lines += output
    wanted = [code for cmd, code in zip(block.commands, expected_exits(block)) if cmd.shell.strip() != "echo $?"]
    problems = [f"{block.where}: `{cmd.shell.strip()[:80]}` exited {got}, the page shows {want}"
                for cmd, got, want in zip([c for c in block.commands if c.shell.strip() != "echo $?"], exits, wanted)
                if got != want]
    return Result(block, lines, exits, problems)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def run_page(page: Path, cache: Path, slow: bool = False, only: str | None = None) -> list[Result]:
    """Run the page's blocks in order in one fresh work directory (the slow ones only when asked, and of
    those only the ones whose commands match the regular expression ``only`` when given)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="ftd-docs-") as tmp:
        work = Path(tmp).resolve()
        for block in parse(page):
            if block.kind == "run" or (slow and (only is None or any(re.search(only, c.shell) for c in block.commands))):
                results.append(run_block(block, work, cache))
    return results


def current(block: Block) -> list[str]:
    return block.page.read_text(encoding="utf-8").split("\n")[block.start:block.end]


# -- the machine a page was written on --------------------------------------------------------------
#: page → the machine (:func:`machine`) its runnable blocks were last written or confirmed on. A short
#: fine-tune's figures depend on the CPU's floating-point paths (the kernels torch and oneDNN pick for its
#: instruction set and caches): the same commands print other digits on another CPU, so a page is compared
#: digit for digit only on the machine that wrote it, and elsewhere word for word with every number masked.
MACHINES = ROOT / "scripts" / "docs_examples_machines.json"


def machine() -> str:
    """The CPU model, torch's CPU kernel level, torch's version and the core count."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}; {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; {os.cpu_count()} CPUs"


def _machines() -> dict[str, str]:
    try:
        return json.loads(MACHINES.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def written_on(page: Path) -> str | None:
    """The machine ``page``'s runnable outputs were written on (None: not recorded)."""
    return _machines().get(str(page.relative_to(ROOT)))


def record(page: Path) -> None:
    """Note that ``page``'s runnable outputs were written (or confirmed) on this machine."""
    known = _machines()
    known[str(page.relative_to(ROOT))] = machine()
    MACHINES.write_text(json.dumps(dict(sorted(known.items())), indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")


_DIGEST = re.compile(r"\b[0-9a-f]{8,}\b")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?")
_BOX = re.compile(r"[\u2500-\u257f]+")


def words(lines: list[str]) -> list[str]:
    """The words of an output with every number and digest as ``#``, box drawing and spacing dropped: what
    stays when a table's digits, its column widths and the summary's line breaks move with the CPU."""
    text = _NUMBER.sub("#", _DIGEST.sub("#", _BOX.sub(" ", "\n".join(lines))))
    return text.split()


def differences(result: Result, digits: bool = True) -> str:
    """The unified diff from what the page shows to what the commands print ('' when equal); with
    ``digits`` False, '' when they differ in numbers, widths and line breaks alone (:func:`words`)."""
    shown = current(result.block)
    if not digits and words(shown) == words(result.lines):
        return ""
    diff = "\n".join(difflib.unified_diff(shown, result.lines, f"{result.block.where} (page)",
                                          "what the commands print", lineterm=""))
    if not digits:
        diff += ("\n(written on another machine: numbers, widths and line breaks were not compared; the words "
                 "differ)")
    return diff


def write(page: Path, results: list[Result]) -> bool:
    lines = page.read_text(encoding="utf-8").split("\n")
    changed = False
    for result in sorted(results, key=lambda r: r.block.start, reverse=True):
        b = result.block
        if lines[b.start:b.end] != result.lines:
            lines[b.start:b.end] = result.lines
            changed = True
    if changed:
        page.write_text("\n".join(lines), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", type=Path, help="pages to run (default: README.md and docs/**/*.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a page is out of date")
    ap.add_argument("--slow", action="store_true", help="also rerun the <!-- output --> blocks")
    ap.add_argument("--only", metavar="REGEX", help="with --slow: only the slow blocks whose commands match")
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="ftd-docs-cache-") as cache:
        for page in [p.resolve() for p in args.pages] or pages():
            results = run_page(page, Path(cache), slow=args.slow, only=args.only)
            for result in results:
                for problem in result.problems:
                    print(problem, file=sys.stderr)
                    bad += 1
            if args.check:
                digits = written_on(page) == machine()
                for result in results:
                    diff = differences(result, digits)
                    if diff:
                        print(diff)
                        bad += 1
            elif results:
                if write(page, results):
                    print(f"rewrote {page.relative_to(ROOT)}")
                if any(r.block.kind == "run" for r in results) and not any(r.problems for r in results):
                    record(page)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
