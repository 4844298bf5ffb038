"""``--dtype``: the forward and backward under autocast change the figures by little (bfloat16 keeps ~3 digits),
the report says which precision ran; and the probe on a GPU gives the CPU's figures (skipped without one)."""
from __future__ import annotations

import copy

import pytest
import torch

from ftdoctor.diagnose import ProbeOptions, probe_model

from helpers import SmallCNN, make_bundle, run_cli


def figures(model, dtype: str, device: str = "cpu") -> dict:
    bundle = make_bundle((3, 16, 16), n=64, num_classes=5, batch_size=16, seed=0)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = probe_model(model.to(device), bundle, ProbeOptions(dtype=dtype), reference=reference.to(device),
                      device=device)
    return {n: r.figures.to_json() for n, r in run.results.items()}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallCNN(num_classes=5).eval()


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_reduced_precision_changes_each_figure_by_little(model, dtype, tol):
    want, got = figures(model, "float32"), figures(model, dtype)
    assert set(got) == set(want) == {"noise", "change_rate", "grad_norm", "r2", "drift"}
    for key in ("noise_fraction", "excess_noise_fraction", "cross_entropy"):
        assert rel(got["noise"][key], want["noise"][key]) < tol / 5, key
    for probe, key in (("change_rate", "change_rate"), ("grad_norm", "grad_norm"), ("r2", "median")):
        for a, b in zip(got[probe]["layers"], want[probe]["layers"]):
            assert a["name"] == b["name"] and rel(a[key], b[key]) < tol, (probe, a["name"], a[key], b[key])
    # the weights are not touched by the forward's precision: drift is exact
    assert got["drift"] == want["drift"]


def test_the_report_says_which_precision_ran(tmp_path):
    torch.manual_seed(0)
    torch.save(SmallCNN(10).state_dict(), tmp_path / "m.pt")
    res = run_cli("probe", tmp_path / "m.pt", "--arch", "helpers:SmallCNN", "--data", "shapes", "--max-samples", "32",
                  "--dtype", "bfloat16", "--format", "json", "--quiet")
    assert res.exit_code == 0, res.output
    assert '"dtype": "bfloat16"' in res.stdout
    res = run_cli("probe", tmp_path / "m.pt", "--data", "shapes", "--dtype", "float8")
    assert res.exit_code == 2 and "float16" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the GPU path is "
                    "tested where one is present")
def test_the_gpu_gives_the_cpus_figures(model):
    want, got = figures(model, "float32"), figures(copy.deepcopy(model), "float32", "cuda")
    for probe in want:
        for a, b in zip(got[probe].get("layers", []), want[probe].get("layers", [])):
            for k, v in b.items():
                if isinstance(v, float):
                    assert rel(a[k], v) < 1e-4, (probe, b["name"], k)


def test_per_example_chunks_follow_the_device():
    from ftdoctor.engine.persample import CPU_CHUNK_BYTES, MAX_CHUNK_BYTES, chunk_budget
    assert chunk_budget(torch.device("cpu")) == CPU_CHUNK_BYTES
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        assert chunk_budget(torch.device("cuda")) == min(MAX_CHUNK_BYTES, max(free // 4, 32 * 2**20))
