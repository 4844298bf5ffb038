"""Extending ftdoctor is one new module plus one registration line: a toy probe, fix, model source, data
source and output format, defined in this file, registered by one line each, run through the CLI.

The toys are written as a user would write them in their own module: a class against the plug-in's
interface. ``toys`` registers them (the one line each) for one test and restores the registries after.
Last, a package installed with an ``ftdoctor.plugins`` entry point reaches the ``ftdoctor`` command itself.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers import NETS_SOURCE, run_cli
from ftdoctor.checkpoint import MODEL_SOURCES, LoadedModel, ModelOptions, ModelSource, register_model_source
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import loaded
from ftdoctor.checkpoint.writing import save_state_dict
from ftdoctor.data import DATA_SOURCES, DataSource, register_data_source
from ftdoctor.data.arrays import ArraySplit, capped
from ftdoctor.fixes import FIXES, Check, Fix, FixContext, FixOutcome, register_fix
from ftdoctor.fixes.base import changed_keys, layer_keys, snapshot
from ftdoctor.probes import PROBES, Probe, ProbeResult, register_probe
from ftdoctor.probes.base import Batch, Figures
from ftdoctor.report import FORMATS, OutputFormat, load_formats, register_format


# -- a model source: a two-layer MLP stored as a state dict (``--arch toy-mlp``, or recognised by its keys) --
class ToyMLP(nn.Module):
    def __init__(self, num_classes: int = 3, in_features: int = 3 * 8 * 8, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.body(x.flatten(1))))


TOY_KEYS = {"body.weight", "body.bias", "out.weight", "out.bias"}


class ToyMLPSource(ModelSource):
    def accepts_arch(self, arch: str) -> bool:
        return arch == "toy-mlp"

    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        named = opts.arch == "toy-mlp" or (opts.arch is None and set(ckpt.state_dict or {}) == TOY_KEYS)
        return "toy" if named and ckpt.state_dict is not None else None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        state = ckpt.state_dict
        classes, hidden = state["out.weight"].shape
        model = ToyMLP(int(classes), int(state["body.weight"].shape[1]), int(hidden))
        model.load_state_dict(state)
        return loaded(ckpt, model, ckpt.format, "toy-mlp", ckpt.container, opts, notes, self.name)

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        return save_state_dict(loaded.container, model, out)


# -- a data source: ``--data stripes``, three classes of horizontal, vertical and diagonal stripes ---------
class StripesData(DataSource):
    def claims(self, data: str) -> bool:
        return data == "stripes"

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        n = capped(60, opts.max_samples)
        labels = np.arange(n) % 3
        i, j = np.mgrid[0:8, 0:8]
        patterns = np.stack([(i % 2), (j % 2), ((i + j) % 2)]).astype(np.float32)          # (3, 8, 8)
        noise = np.random.default_rng(opts.seed).normal(0, 0.1, (n, 3, 8, 8)).astype(np.float32)
        images = patterns[labels][:, None].repeat(3, axis=1) + noise
        return ArraySplit(images, "NCHW", labels, 3), "stripes"

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        return []


# -- a probe: the mean logit margin (top-1 minus top-2 logit) over the data -------------------------------
@dataclass(frozen=True)
class MarginFigures(Figures):
    mean_margin: float

    def to_json(self) -> dict[str, Any]:
        return {"mean_margin": self.mean_margin}


class MarginProbe(Probe):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.add_state("total", torch.zeros((), dtype=torch.float64))
        self.add_state("count", torch.zeros((), dtype=torch.float64))

    def update(self, batch: Batch) -> None:
        top2 = batch.logits.double().topk(2, dim=1).values
        self.total += (top2[:, 0] - top2[:, 1]).sum()
        self.count += batch.size

    def compute(self) -> ProbeResult:
        return ProbeResult(MarginFigures(float(self.total / self.count)))

    @classmethod
    def summary(cls, figures: Figures) -> list[tuple[str, str]]:
        return [("mean logit margin", f"{figures['mean_margin']:.4f}")]


# -- a fix: zero the head's bias -------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroBiasOptions:
    pass


class ZeroBias(Fix[ZeroBiasOptions]):
    def before(self, ctx: FixContext) -> dict[str, torch.Tensor]:
        return snapshot(ctx.model)

    def apply(self, ctx: FixContext, before: Any) -> None:
        with torch.no_grad():
            ctx.head.module.bias.zero_()

    def verify(self, ctx: FixContext, before: Any, applied: Any) -> FixOutcome:
        bias = ctx.head.module.bias
        changed = changed_keys(before, snapshot(ctx.model))
        return FixOutcome(parameters={}, changes=layer_keys(ctx.model, [ctx.head.name]),
                          checks=[Check("head_bias_zero", after=float(bias.detach().abs().max()), target="0",
                                        passed=bool((bias == 0).all())),
                                  Check("only_the_bias_changed", after=float(len(changed)), target="1",
                                        passed=changed <= {f"{ctx.head.name}.bias"})])


# -- an output format: the probe report's summary figures as CSV -----------------------------------------
class SummaryCsv(OutputFormat):
    def text(self, report: Any) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["probe", "figure", "value"])
        for probe, figures in report.to_json()["probes"].items():
            for key, value in figures.items():
                if not isinstance(value, (list, dict)):
                    writer.writerow([probe, key, value])
        return out.getvalue()


@pytest.fixture
def toys():
    """Register each toy with its one line; afterwards the registries are as they were."""
    load_formats()   # the built-in formats register on first use: before the snapshot
    saved = [(registry, dict(registry)) for registry in (MODEL_SOURCES, DATA_SOURCES, PROBES, FIXES, FORMATS)]
    register_model_source(ToyMLPSource, name="toy-mlp", priority=50)
    register_data_source(StripesData, name="stripes", names=("stripes",))
    register_probe(MarginProbe, name="margin", description="mean top-1 minus top-2 logit")
    register_fix(ZeroBias, name="zero-bias", options_type=ZeroBiasOptions, summary="zero the head's bias")
    register_format(SummaryCsv, name="csv", kinds=frozenset({"probe"}))
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.fixture
def toy_model(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ToyMLP()
    with torch.no_grad():
        model.out.bias.copy_(torch.tensor([0.5, -0.25, 1.0]))
    torch.save(model.state_dict(), tmp_path / "toy.pt")
    return tmp_path / "toy.pt"


def _margin_by_hand(state: dict[str, torch.Tensor]) -> float:
    model = ToyMLP()
    model.load_state_dict(state)
    split, _ = StripesData().open("stripes", type("Opts", (), {"max_samples": None, "seed": 0})())
    with torch.no_grad():
        top2 = model(torch.as_tensor(split.images)).double().topk(2, dim=1).values
    return float((top2[:, 0] - top2[:, 1]).mean())


def test_every_kind_of_plug_in_runs_through_the_cli(toys, toy_model):
    # the probe, the data source and the model source (recognised from the keys; no --arch)
    code, out, err = run_cli("probe", toy_model, "--data", "stripes", "--normalize", "none", "--probes", "margin,grad_norm",
                             "--format", "json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["arch"] == "toy-mlp" and doc["data"]["name"] == "stripes"
    assert list(doc["probes"]) == ["grad_norm", "margin"]          # built-ins first, then by registration
    assert doc["probes"]["margin"]["mean_margin"] == pytest.approx(_margin_by_hand(torch.load(toy_model)), rel=1e-6)

    # the output format, and the probe's summary line in the default table
    code, out, err = run_cli("probe", toy_model, "--arch", "toy-mlp", "--data", "stripes", "--normalize", "none",
                             "--probes", "margin", "--format", "csv", "--quiet")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["probe", "figure", "value"] and rows[1][:2] == ["margin", "mean_margin"]
    code, out, err = run_cli("probe", toy_model, "--data", "stripes", "--normalize", "none", "--probes", "margin",
                             "--quiet")
    assert code == 0 and "mean logit margin" in out, out + err

    # the fix, written back by the model source in the input's format, then probed again
    code, out, err = run_cli("fix", toy_model, "--method", "zero-bias", "--data", "stripes", "--normalize", "none",
                             "-o", "fixed.pt", "--quiet")
    assert code == 0, out + err
    before, after = torch.load(toy_model), torch.load(toy_model.with_name("fixed.pt"))
    assert set(after) == TOY_KEYS and torch.equal(after["out.bias"], torch.zeros(3))
    assert all(torch.equal(before[k], after[k]) for k in TOY_KEYS - {"out.bias"})
    sidecar = json.loads(toy_model.with_name("fixed.pt.ftdoctor.json").read_text())
    assert sidecar["verification"]["passed"]


def test_the_cli_lists_and_validates_plug_ins_by_their_registered_names(toys, toy_model):
    code, out, err = run_cli("fix", "--help")
    assert code == 0 and "zero-bias" in out
    code, out, err = run_cli("probe", toy_model, "--data", "strips", "--quiet")
    assert code == 2 and "stripes" in err                     # the hint lists the registered data names
    code, out, err = run_cli("probe", toy_model, "--data", "stripes", "--probes", "margn", "--quiet")
    assert code == 2 and "margin" in err
    code, out, err = run_cli("inspect", toy_model, "--format", "csv")
    assert code == 2 and "does not apply to inspect" in err


def test_without_the_registration_lines_the_toys_do_not_exist(toy_model, good_model):
    code, out, err = run_cli("probe", toy_model, "--data", "shapes", "--quiet")
    assert code == 2 and "matches no torchvision" in err
    code, out, err = run_cli("probe", toy_model, "--arch", "toy-mlp", "--data", "shapes", "--quiet")
    assert code == 2 and "unknown architecture 'toy-mlp'" in err
    code, out, err = run_cli("probe", good_model, "--arch", "ftd_hostile_nets:SmallCNN", "--data", "stripes",
                             "--quiet")
    assert code == 2 and "stripes" in err and "shapes" in err, err


PLUGIN_MODULE = '''
import numpy as np
from ftdoctor.data import DataSource, register_data_source
from ftdoctor.data.arrays import ArraySplit


@register_data_source(name="checkers", names=("checkers",))
class Checkers(DataSource):
    def claims(self, data):
        return data == "checkers"

    def open(self, data, opts):
        labels = np.arange(30) % 3
        i, j = np.mgrid[0:8, 0:8]
        images = np.stack([(i // (k + 1) + j // (k + 1)) % 2 for k in range(3)]).astype(np.float32)[labels]
        return ArraySplit(np.repeat(images[:, None], 3, axis=1), "NCHW", labels, 3), "checkers"

    def inputs(self, data, data_root):
        return []
'''


def _installed(site: Path, module: str, source: str) -> None:
    """``module`` as an installed distribution naming it in the ``ftdoctor.plugins`` entry-point group."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ftdoctor.plugins]\n{module} = {module}\n")


def test_an_installed_package_s_plug_ins_reach_the_ftdoctor_command(tmp_path):
    """The `ftdoctor` command itself (a fresh process) finds plug-ins of installed packages through the
    ``ftdoctor.plugins`` entry points, so commands it prints that name them run as printed."""
    site = tmp_path / "site"
    site.mkdir()
    _installed(site, "ftd_checkers", PLUGIN_MODULE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    arch = ["--arch", "ftd_hostile_nets:SmallCNN"]
    (tmp_path / "ftd_hostile_nets.py").write_text(NETS_SOURCE)
    subprocess.run([sys.executable, "-c", "import torch, ftd_hostile_nets as n; "
                    "torch.save(n.SmallCNN(3).state_dict(), 'three.pt')"], cwd=tmp_path, check=True, env=env)
    done = subprocess.run([sys.executable, "-m", "ftdoctor", "probe", "three.pt", *arch, "--data", "checkers",
                           "--normalize", "none", "--format", "json", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"] == {"name": "checkers", "split": "train", "num_samples": 30,
                                               "num_classes": 3,
                                               "subset": {"mode": "all", "kept": 30, "total": 30, "seed": None}}

    _installed(site, "ftd_broken", "raise ImportError('needs a library that is not installed')\n")
    done = subprocess.run([sys.executable, "-m", "ftdoctor", "probe", "three.pt", *arch, "--data", "checkers"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot load the ftdoctor plug-in 'ftd_broken'" in done.stderr and "uninstall ftd_broken" in done.stderr
