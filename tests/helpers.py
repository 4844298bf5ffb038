"""What many test modules share and that is not a fixture: tiny models, an in-memory data bundle, the
source of an importable test-nets module, and the one CLI runner.

(Fixtures live in ``conftest.py``; this module is imported by name: ``from helpers import run_cli``.)
"""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class _Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


@dataclass
class TensorBundle:
    """Duck-types ftdoctor.data.DataBundle over tensors already in memory."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    batch_size: int = 16
    name: str = "tensors"
    split: str = "train"
    notes: list = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def dataset(self) -> Dataset:
        return _Indexed(self.x, self.y)

    @property
    def image_shape(self):
        return tuple(self.x.shape[1:])

    def loader(self, batch_size=None, shuffle=False, seed=0, sampler=None, drop_last=False):
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=gen, sampler=sampler, drop_last=drop_last)


def make_bundle(shape, n=48, num_classes=5, batch_size=16, seed=0) -> TensorBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorBundle(x, y, num_classes, batch_size)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 5, in_ch: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(8 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class DeepNet(nn.Module):
    """A stem, ``stages`` residual stages of two Linear layers each (blocks ``stages.K``) and a head:
    2·stages + 2 affine layers (100 by default), small enough to probe in seconds."""

    def __init__(self, num_classes: int = 10, stages: int = 49, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(stages))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.pool(torch.relu(self.stem(x))).flatten(1)
        for stage in self.stages:
            h = h + 0.5 * stage(h)
        return self.fc(h)


class BNCNN(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


# An importable module's source (`--arch MODULE:SmallCNN`) for tests that drive the CLI: they write it
# into a temporary directory on sys.path under a name of their own.
NETS_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self, num_classes=10, in_ch=3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.fc = nn.Linear(8 * 4, num_classes)

        def forward(self, x):
            return self.fc(self.features(x))

    class NoAffine(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.bn(x)).flatten(1)
''')


@dataclass(frozen=True)
class CliResult:
    """What ``ftdoctor ARGS`` did: its exit code and what it printed."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __iter__(self):   # code, out, err = run_cli(...)
        return iter((self.exit_code, self.stdout, self.stderr))


def run_cli(*args: object, env: dict[str, str | None] | None = None) -> CliResult:
    """``ftdoctor ARGS`` through the real entry point (:func:`ftdoctor.cli.main`: the exit codes and the
    two-line errors users see), isolated by typer's :class:`~typer.testing.CliRunner`."""
    from typer.testing import CliRunner

    from ftdoctor.cli import main

    code = 0
    with CliRunner().isolation(env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()   # the isolation's text wrappers buffer; flush before reading the bytes
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliResult(code, stdout, stderr)


def layer_squares_vs_loop(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every Linear/Conv2d of ``model``: (``grad_sq_sum`` on the input and output gradient captured in one
    batched backward of ``Σ η·model(x)``, the same Σ_n (∂ℓ_n/∂W)² from a loop over single examples)."""
    from ftdoctor.engine.persample import grad_sq_sum

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    captured: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(module, inputs, out):
            captured[name] = [inputs[0].detach()]
            out.register_hook(lambda grad: captured[name].append(grad))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    out = model(x)
    eta = torch.randn_like(out)
    (eta * out).sum().backward()
    for h in handles:
        h.remove()
    want = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for i in range(x.shape[0]):
        model.zero_grad()
        (eta[i:i + 1] * model(x[i:i + 1])).sum().backward()
        for n, m in layers.items():
            want[n] += m.weight.grad ** 2
    return {n: (grad_sq_sum(m, *captured[n])[0], want[n]) for n, m in layers.items()}


def flat_figures(block, prefix: str = "") -> dict:
    """A probe's JSON block as {path: leaf}: nested dicts and lists flattened (rows by position)."""
    out: dict = {}
    if isinstance(block, dict):
        for k, v in block.items():
            out.update(flat_figures(v, f"{prefix}/{k}"))
    elif isinstance(block, (list, tuple)):
        for i, v in enumerate(block):
            out.update(flat_figures(v, f"{prefix}/{i}"))
    else:
        out[prefix] = block
    return out


def assert_figures_close(mine: dict, truth: dict, rel: float = 1e-5, skip: tuple[str, ...] = ()) -> int:
    """Every number of ``mine`` within ``rel`` (relative, with a 1e-12 floor) of ``truth``, every other leaf
    equal, the same keys; returns how many numbers were compared. A change_rate block in the monitor's
    ``totals`` mode is compared with probe's ``exact`` one on everything but the mode and the cvs."""
    a, b = flat_figures(mine), flat_figures(truth)
    if a.get("/mode") == "totals" and b.get("/mode") == "exact":
        # the monitor's default change_rate mode sums only Σ_e G²_e: the same rates and spreads, no cv
        skip = (*skip, "/mode", "/cv", "/column_cv")
    keys = [k for k in b if not any(s in k for s in skip)]
    assert sorted(k for k in a if not any(s in k for s in skip)) == sorted(keys)
    n = 0
    for k in keys:
        x, t = a[k], b[k]
        if isinstance(t, float) and isinstance(x, (int, float)) and not isinstance(x, bool):
            assert abs(x - t) <= rel * max(abs(t), 1e-12), (k, x, t)
            n += 1
        else:
            assert x == t, (k, x, t)
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node 2 ARGS`` (gloo on loopback) and return the finished process.

    gloo's TCP transport can abort a rank from one of its C++ threads (SIGABRT, no Python traceback) when a
    connection races its peer (pytorch/gloo#514). It was seen once in CI and not reproduced here in 44 runs,
    32 of them four at a time; such a run is tried once more. Any other failure, or the abort twice, fails with
    the head of stderr as well as its tail: the rank's own message is at the head, torchrun's traceback after it.
    """
    failures = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            return run
        failures.append(run.stderr)
        worker_raised = run.stderr.count("Traceback (most recent call last)") > 1   # torchrun prints one
        if "SIGABRT" not in run.stderr or worker_raised:
            break
    raise AssertionError("torchrun failed:\n" + "\n---\n".join(f[:3000] + "\n...\n" + f[-1500:] for f in failures))
