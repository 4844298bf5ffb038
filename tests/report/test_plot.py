"""ftdoctor plot: a valid PNG for trace, compare and probe files; clean errors otherwise."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ftdoctor.dynamics import CompareResult, TraceOptions, TraceResult, compare_model, trace_model, write_hdf5
from ftdoctor.errors import FtdoctorError
from ftdoctor.report import hdf5 as hdf5_report
from ftdoctor.report.plot import ProbeFile, TraceFile, plot, read, require_matplotlib

from helpers import SmallCNN, make_bundle

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=7).eval()
    train = make_bundle((3, 16, 16), n=48, num_classes=5, seed=0)
    test = make_bundle((3, 16, 16), n=24, num_classes=5, seed=1)
    opts = TraceOptions(steps=8, batch_size=8, window=3, eval_every=4, lr=1e-3)
    trace_run, _ = trace_model(model, train, test, opts)
    methods = ("base", "entame", "rifle")
    rows, cruns = compare_model(model, train, test, opts, methods, seeds=2)
    data = {"name": "tensors", "num_classes": 5, "eval_split": "test", "eval_samples": 24}
    trace_res = TraceResult({"path": "m.pt"}, data, {"window": 3, **opts.settings()}, trace_run)
    cmp_res = CompareResult({"path": "m.pt"}, data, {"methods": list(methods), **opts.settings()}, 3, 8, (0, 1),
                            rows, cruns)
    return trace_res, cmp_res


def probe_file(path: Path) -> Path:
    """A probe HDF5 file as ``probe --hdf5`` writes it (SPEC §3): report JSON + per-channel R² arrays."""
    names = ["features.0", "features.3", "fc"]
    doc = {"schema": "ftdoctor.report/1", "model": {"path": "m.pt"}, "data": {"name": "shapes", "num_samples": 64},
           "probes": {
               "change_rate": {"spread": 4.0, "log_std": 0.5, "layers": [
                   {"name": n, "kind": "Conv2d", "change_rate": r, "cv": 1.0, "column_cv": 1.0}
                   for n, r in zip(names, [0.01, 0.04, 0.02])]},
               "grad_norm": {"depth_ratio": 0.1, "layers": [
                   {"name": n, "grad_norm": g} for n, g in zip(names, [0.1, 0.5, 1.0])]},
               "r2": {"layers": [{"name": n, "channels": 8, "median": 0.9} for n in names[:2]]}},
           "skipped": [], "findings": []}
    rng = np.random.default_rng(0)
    arrays = {f"probes/r2/{n}/r2": rng.uniform(0.5, 1.0, 8) for n in names[:2]}
    arrays.update({f"probes/r2/{n}/r2_identity": rng.uniform(0.0, 1.0, 8) for n in names[:2]})
    hdf5_report.write(path, "ftdoctor.report/1", doc, arrays)
    return path


def test_plot_trace_file(runs, tmp_path):
    write_hdf5(tmp_path / "t.h5", runs[0])
    out = plot(tmp_path / "t.h5", tmp_path / "t.png")
    w, h = png_size(out)
    assert w >= 1000 and h >= 700


def test_plot_compare_file(runs, tmp_path):
    write_hdf5(tmp_path / "c.h5", runs[1])
    content = read(tmp_path / "c.h5")
    assert isinstance(content, TraceFile) and content.methods == ["base", "entame", "rifle"]
    assert {r.seed for r in content.runs} == {0, 1}
    assert content.of("rifle")[0].series["reinitialised"].tolist() == [2, 4, 6]
    out = plot(tmp_path / "c.h5", tmp_path / "c.png")
    w, h = png_size(out)
    assert w >= 1000 and h >= 900


def test_plot_probe_file(tmp_path):
    path = probe_file(tmp_path / "p.h5")
    content = read(path)
    assert isinstance(content, ProbeFile) and "probes/r2/features.0/r2" in content.arrays
    w, h = png_size(plot(path, tmp_path / "p.png"))
    assert w >= 800 and h >= 250


def test_probe_picture_names_every_layer_however_many(tmp_path):
    """One row per layer (every name written out): the picture grows with the layers instead of squeezing."""
    from ftdoctor.report import charts
    names = [f"blocks.{i // 3}.fc{i % 3}" for i in range(300)]
    doc = {"schema": "ftdoctor.report/1", "model": {"path": "m.pt"}, "data": {"name": "shapes"},
           "probes": {"grad_norm": {"depth_ratio": 0.1, "head": names[-1], "layers": [
               {"name": n, "grad_norm": 0.1 + i} for i, n in enumerate(names)]}}, "findings": [], "skipped": []}
    hdf5_report.write(tmp_path / "big.h5", "ftdoctor.report/1", doc, {})
    w, h = png_size(plot(tmp_path / "big.h5", tmp_path / "big.png"))
    assert h >= 300 * charts.ROW * 110                      # 110 dpi: at least ROW inches a layer
    fig = charts.layers_figure(read(tmp_path / "big.h5"))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == names


def test_plot_other_formats(runs, tmp_path):
    write_hdf5(tmp_path / "t.h5", runs[0])
    assert plot(tmp_path / "t.h5", tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")
    assert plot(tmp_path / "t.h5", tmp_path / "t.pdf").read_bytes()[:5] == b"%PDF-"


def test_plot_rejects_what_it_cannot_draw(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FtdoctorError, match="not an ftdoctor file"):
        plot(tmp_path / "other.h5", tmp_path / "o.png")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(FtdoctorError, match="not an HDF5 file"):
        plot(tmp_path / "junk.h5", tmp_path / "j.png")
    with pytest.raises(FtdoctorError, match="does not exist"):
        plot(tmp_path / "missing.h5", tmp_path / "m.png")
    path = probe_file(tmp_path / "p.h5")
    with pytest.raises(FtdoctorError, match="format"):
        plot(path, tmp_path / "p.jpeg")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpeg"))


def test_missing_matplotlib_is_exit_2_with_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    with pytest.raises(FtdoctorError) as exc:
        require_matplotlib()
    assert exc.value.exit_code == 2 and "ftdoctor[plot]" in exc.value.remedy
    from ftdoctor import cli
    path = probe_file(tmp_path / "p.h5")
    old = sys.argv
    sys.argv = ["ftdoctor", "plot", str(path), "-o", str(tmp_path / "p.png")]
    try:
        with pytest.raises(SystemExit) as code:
            cli.main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    assert code.value.code == 2
    assert "matplotlib" in err and "pip install 'ftdoctor[plot]'" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()
