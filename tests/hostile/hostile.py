"""The hostile-input suite's tools: run ftdoctor as a user would and check the SPEC §8 invariants.

Every case builds its hostile files in a fresh directory, runs the real entry
point (in this process, or in a child process where a signal or a hang is the
point) and :func:`assert_refused` checks what must hold whatever the input:
the exit code, one line of cause and one of remedy, no traceback, no code run
(the canary file never appears), no new file, every existing file
byte-identical, bounded time and bounded memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path


sys.dont_write_bytecode = True   # importing the test nets must not count as a file ftdoctor wrote
CANARY = "pwned-canary"
SECONDS = 30          # a hang guard, not a speed test: a case still running after this has hung
GROWTH_MB = 1500      # peak memory a case may add (a bomb would add gigabytes)

ARCH = ("--arch", "ftd_hostile_nets:SmallCNN")
SMALL = ("--max-samples", "32", "--batch-size", "16", "--quiet")


#: a TorchScript module whose __setstate__ writes a file of its choosing when the archive is loaded
PAYLOAD = textwrap.dedent('''
    import torch
    from typing import Tuple

    class Payload(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.ones(1)

        def forward(self, x):
            return x * self.scale

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:
            return (self.scale, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
            # TorchScript can write files: a shared mapping of a path it chooses
            t = torch.from_file("CANARY", True, 8, dtype=torch.uint8)
            t.fill_(65)
            self.training = state[1]
            self.scale = state[0] + t[:1].float() * 0

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = Payload()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.features(self.pre(x)))
''')


class Evil:
    """Unpickled with full pickle, this would create the canary file (an absolute path)."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    hung: bool
    growth_mb: float
    created: list[str]
    changed: list[str]
    canary: bool


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) -> its kind and, for regular files, content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            info = os.lstat(p)
            if stat.S_ISREG(info.st_mode):
                out[str(p.relative_to(root))] = "file " + _digest(p)
            elif stat.S_ISLNK(info.st_mode):
                out[str(p.relative_to(root))] = "link " + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = f"mode {stat.S_IFMT(info.st_mode)}"
    return out


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns the RSS in kB."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return _vm("VmRSS")


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: int = SECONDS):
    """Fail (not hang) when a case blocks: SIGALRM interrupts even a blocking open() of a FIFO."""
    def ring(signum, frame):
        raise _Alarm(f"hung for {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(cwd: Path, *args: object, root: Path | None = None) -> Outcome:
    """``ftdoctor ARGS`` through the real entry point in this process (the suite's one runner,
    :func:`helpers.run_cli`), working directory ``cwd``, under a watchdog, peak memory measured."""
    from helpers import run_cli

    root = root or cwd
    before = tree(root)
    old_cwd = os.getcwd()
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    rss = _reset_peak()
    try:
        with watchdog():   # a hang raises here, failing the test
            result = run_cli(*args)
    finally:
        growth = max(0, _vm("VmHWM") - rss) / 1024
        os.chdir(old_cwd)
        sys.path.remove(str(cwd))
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return _outcome(root, before, result.exit_code, result.stdout, result.stderr, False, growth)


def _outcome(root: Path, before: dict[str, str], code: int, out: str, err: str, hung: bool,
             growth: float) -> Outcome:
    after = tree(root)
    created = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    canary = any(Path(k).name == CANARY for k in after) or (root / CANARY).exists()
    return Outcome(code, out, err, hung, growth, created, changed, canary)


HARNESS = textwrap.dedent('''
    """Run ftdoctor's entry point after arranging for a signal at one chosen moment (hostile suite)."""
    import atexit, os, signal, sys
    sys.path.insert(0, os.getcwd())
    moment, signame = sys.argv[1], sys.argv[2]
    sig = getattr(signal, signame, None)
    fired = []

    def peak():                                # this process's own peak RSS (kB), for the parent
        with open("/proc/self/status") as f:
            kb = next((line.split()[1] for line in f if line.startswith("VmHWM")), "0")
        with open(os.environ["FTD_TEST_PEAK_FILE"], "w") as f:
            f.write(kb)
    atexit.register(peak)

    def fire():
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), sig)

    from ftdoctor import outputs, checkpoint, engine
    if moment == "load":                       # right after the checkpoint is read
        real_load = checkpoint.load_model
        def load(*a, **k):
            m = real_load(*a, **k); fire(); return m
        checkpoint.load_model = load
    elif moment == "pass":                     # while the data is being read for the pass
        from ftdoctor import data
        real_prepare = data.PreparedDataset.prepare
        def prepare(self, *a, **k):
            out = real_prepare(self, *a, **k); fire(); return out
        data.PreparedDataset.prepare = prepare
    elif moment == "between":                  # after the first output is in place, before the next
        real_install = outputs.Journal.install
        def install(self, tmp, out):
            real_install(self, tmp, out); fire()
        outputs.Journal.install = install
    elif moment == "writing":                  # the first output complete on disk, not yet renamed
        real_install = outputs.Journal.install
        def install(self, tmp, out):
            fire(); real_install(self, tmp, out)
        outputs.Journal.install = install
    elif moment == "commit":                   # while the outputs are being made final
        real_commit = outputs.Journal.commit
        def commit(self):
            with outputs.critical():
                fire()
                return real_commit(self)
        outputs.Journal.commit = commit
    from ftdoctor import cli
    sys.argv = ["ftdoctor", *sys.argv[3:]]
    cli.main()
''')


def run_child(cwd: Path, *args: object, harness: tuple[str, str] | None = None, timeout: float = SECONDS,
              signal_after: tuple[float, int] | None = None, root: Path | None = None) -> Outcome:
    """``ftdoctor ARGS`` in a child process: for signals (``harness`` = (moment, SIGNAME), or
    ``signal_after`` = (seconds, signum) from outside) and hangs; its own peak RSS is measured."""
    root = root or cwd
    before = tree(root)
    cmd = [sys.executable, "-c", HARNESS, *(harness or ("none", "-")), *map(str, args)]
    out_path, err_path = root.parent / f".{root.name}.out", root.parent / f".{root.name}.err"
    peak_path = root.parent / f".{root.name}.peak"
    env = {**os.environ, "PYTHONPATH": str(cwd) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1", "FTD_TEST_PEAK_FILE": str(peak_path)}
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fo, stderr=fe, env=env)
        killed = []
        killer = threading.Timer(timeout, lambda: (killed.append(1), proc.kill()))
        killer.start()
        sender = None
        if signal_after is not None:
            sender = threading.Timer(signal_after[0], lambda: proc.poll() is None and proc.send_signal(signal_after[1]))
            sender.start()
        proc.wait()
        killer.cancel()
        if sender is not None:
            sender.cancel()
    hung = bool(killed)
    out, err = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    # The child's own VmHWM, written at exit. (Not wait4's ru_maxrss: a child spawned by vfork/fork
    # inherits the parent's high-water mark at exec, so it would measure the test process.)
    peak_mb = int(peak_path.read_text() or 0) / 1024 if peak_path.exists() else 0.0
    peak_path.unlink(missing_ok=True)
    return _outcome(root, before, proc.returncode, out, err, hung, peak_mb)


def assert_clean(o: Outcome, code: int, *, mentions: tuple[str, ...] = (), growth_mb: float = GROWTH_MB,
                 child_rss_mb: float | None = None) -> None:
    """The invariants of every refused input: exit ``code``, a cause and a remedy (exit 2), no
    traceback, no code run, no new file, every file unchanged, no hang, bounded memory."""
    text = o.out + o.err
    assert not o.hung, f"still running after {SECONDS} s: killed"
    assert o.code == code, f"exit {o.code}, wanted {code}:\n{text}"
    assert "Traceback" not in text, text
    if code == 2:
        lines = [line for line in o.err.splitlines() if line.strip()]
        assert any(line.startswith("error:") for line in lines) and any(line.startswith("hint:") for line in lines), text
        assert "unexpected" not in o.err, text
    for word in mentions:
        assert word in text, f"{word!r} not in:\n{text}"
    assert not o.canary, "code from the file ran: the canary exists"
    assert not o.created, f"new files: {o.created}"
    assert not o.changed, f"changed files: {o.changed}"
    if child_rss_mb is not None:
        assert o.growth_mb < child_rss_mb, f"peak RSS {o.growth_mb:.0f} MB"
    else:
        assert o.growth_mb < growth_mb, f"peak memory grew by {o.growth_mb:.0f} MB"
