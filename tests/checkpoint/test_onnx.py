"""The ONNX model source: tiny torch → ONNX exports in both weight layouts, the fix round trip through
onnxruntime, the refusals, and the real PP-OCR direction classifier against onnxruntime itself."""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
ort = pytest.importorskip("onnxruntime")

from helpers import run_cli
from ftdoctor.checkpoint import ModelOptions, load_model
from ftdoctor.errors import FtdoctorError


class TinyCNN(nn.Module):
    """Conv → ReLU → pool → Linear (exported as Gemm)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class MatMulHead(TinyCNN):
    """The same, its head as ``x @ W + b`` and a Softmax at the end (what PaddlePaddle exports)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(classes)
        self.w = nn.Parameter(torch.randn(6, classes) * 0.3)
        self.b = nn.Parameter(torch.randn(classes) * 0.1)

    def logits(self, x):
        x = F.relu(self.conv2(F.relu(self.conv(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) @ self.w + self.b

    def forward(self, x):
        return self.logits(x).softmax(-1)


def export(model: nn.Module, path: Path, opset: int = 13, size: int = 8) -> Path:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(2, 3, size, size), buffer, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    path.write_bytes(buffer.getvalue())
    return path


def as_constants(path: Path) -> Path:
    """Rewrite ``path`` with every initializer stored as a Constant node (PaddlePaddle's layout)."""
    proto = onnx.load(str(path))
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
             for t in proto.graph.initializer]
    names = {t.name for t in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.initializer[:]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    rest = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes + rest)
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return path


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def test_initializer_layout_gives_the_torch_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    path = export(model, tmp_path / "m.onnx")
    loaded = load_model(path)
    assert loaded.format == "onnx" and loaded.source == "onnx" and loaded.num_classes == 3
    assert isinstance(loaded.model.get_submodule(loaded.head_key), nn.Linear)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)
    assert any("ONNX opset 13" in n for n in loaded.notes)


def test_constant_layout_softmax_and_matmul_head(tmp_path):
    torch.manual_seed(1)
    model = MatMulHead(4)
    path = as_constants(export(model, tmp_path / "m.onnx", opset=11))
    assert not onnx.load(str(path)).graph.initializer
    loaded = load_model(path)
    head = loaded.model.get_submodule(loaded.head_key)
    assert isinstance(head, nn.Linear) and loaded.num_classes == 4      # MatMul + Add became the head
    assert torch.equal(head.weight.detach(), model.w.detach().t())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():                                                # the probes see logits
        assert torch.allclose(loaded.model(x), model.logits(x), atol=1e-6)
    notes = " ".join(loaded.notes)
    assert "Constant nodes read as weights" in notes and "ends in Softmax" in notes


@pytest.mark.parametrize("layout", ["initializers", "constants"])
def test_fix_writes_the_same_graph_with_only_the_changed_weights(tmp_path, layout):
    torch.manual_seed(2)
    path = export(MatMulHead(3), tmp_path / "m.onnx", opset=11)
    if layout == "constants":
        as_constants(path)
    out = tmp_path / "fixed.onnx"
    code, stdout, stderr = run_cli("fix", path, "--method", "entame", "--data", "shapes:5", "--new-head",
                                   "--max-samples", "40", "--image-size", "8", "-o", out)
    assert code == 0, stdout + stderr
    before, after = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert after.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5
    fixed = load_model(out)
    assert fixed.num_classes == 5
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = fixed.model(x).softmax(-1).numpy()
    assert np.abs(run_ort(out, x) - want).max() <= 1e-5
    # the backbone's tensors are byte-identical; only the head's two changed
    from onnx import numpy_helper

    def tensors(proto):
        found = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        found.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                      if n.op_type == "Constant"})
        return found

    a, b = tensors(before), tensors(after)
    changed = [k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]
    assert len(changed) == 2 and all(b[k].shape[-1] == 5 for k in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "fixed.onnx.ftdoctor.json", "m.onnx"]


def test_rescale_round_trip_preserves_the_function(tmp_path):
    torch.manual_seed(3)
    path = export(TinyCNN(3), tmp_path / "m.onnx")
    out = tmp_path / "r.onnx"
    code, stdout, stderr = run_cli("fix", path, "--method", "rescale", "--data", "shapes:3", "--max-samples", "48",
                                   "--image-size", "8", "-o", out)
    assert code == 0, stdout + stderr
    x = torch.randn(4, 3, 8, 8)
    assert np.abs(run_ort(out, x) - run_ort(path, x)).max() <= 1e-5


def test_custom_domain_is_refused_unless_trusted(tmp_path):
    path = export(TinyCNN(), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    node = proto.graph.node[-1]
    relu = onnx.helper.make_node("MyRelu", [node.output[0]], ["z"], domain="com.example.ops", name="custom")
    proto.graph.node.append(relu)
    proto.graph.output[0].name = "z"
    proto.opset_import.append(onnx.helper.make_opsetid("com.example.ops", 1))
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(FtdoctorError, match="custom domain.*com.example.ops") as err:
        load_model(path)
    assert "--trust-checkpoint" in err.value.remedy
    with pytest.raises(FtdoctorError, match="MyRelu.*cannot be converted"):
        load_model(path, ModelOptions(trust_checkpoint=True))
    code, out, err_text = run_cli("check", path)
    assert code == 1 and "com.example.ops" in out + err_text


def test_unsupported_operator_is_one_line_naming_it(tmp_path):
    path = export(TinyCNN(), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    last = proto.graph.node[-1]
    proto.graph.node.append(onnx.helper.make_node("Hardmax", [last.output[0]], ["z"], name="hardmax", axis=1))
    proto.graph.output[0].name = "z"
    path.write_bytes(proto.SerializeToString())
    code, _, err = run_cli("inspect", path)
    assert code == 2
    assert "Hardmax" in err and "cannot be converted" in err and "Traceback" not in err


def test_external_data_only_from_beside_the_model(tmp_path):
    torch.manual_seed(4)
    model = TinyCNN()
    path = export(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "ext.onnx").model(x), model(x), atol=1e-6)
    outside = tmp_path / "sub"
    outside.mkdir()
    proto = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../ext.data"
    (outside / "evil.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(FtdoctorError, match="outside the model's folder"):
        load_model(outside / "evil.onnx")


def test_check_judges_a_mixed_folder_file_by_file(tmp_path):
    torch.manual_seed(5)
    model = TinyCNN()
    folder = tmp_path / "exports"
    folder.mkdir()
    export(model, folder / "m.onnx")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(folder / "m.safetensors"))
    torch.save(model.state_dict(), folder / "m.pt")
    (folder / "broken.onnx").write_bytes(b"\x08\x07garbage")
    onnx.save_model(onnx.load(str(folder / "m.onnx")), str(folder / "ext.onnx"), save_as_external_data=True,
                    location="ext.bin", size_threshold=0)       # ext.bin is ext.onnx's data, not a checkpoint
    code, out, err = run_cli("check", folder, "--format", "json", "--arch", "tests.checkpoint.test_onnx:TinyCNN")
    report = json.loads(out)
    results = {Path(c["path"]).name: c["passed"] for c in report["checkpoints"]}
    assert results == {"broken.onnx": False, "ext.onnx": True, "m.onnx": True, "m.pt": True,
                       "m.safetensors": True}, out + err
    assert code == 1


# ---------------------------------------------------------------------------------------- the real network


def ppocr_classifier() -> Path:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    path = Path(os.path.dirname(rapidocr.__file__)) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.is_file():
        pytest.skip("rapidocr-onnxruntime ships no direction classifier")
    return path


def test_ppocr_figures_equal_onnxruntime_per_example(tmp_path):
    """ftdoctor's noise figures and gradient norms on PP-OCR's classifier equal a computation from scratch:
    onnxruntime's probabilities per example (the file's own runtime, not the converted module) and
    autograd on the converted module batch by batch."""
    from ftdoctor.data import DataOptions, load_data

    path = ppocr_classifier()
    report = tmp_path / "probe.json"
    code, out, err = run_cli("probe", path, "--data", "textlines:2", "--normalize", "inception", "--max-samples",
                             "32", "--batch-size", "16", "--probes", "noise,grad_norm", "--format", "json",
                             "--output", report)
    assert code in (0, 1), out + err
    figures = json.loads(report.read_text())["probes"]
    bundle = load_data(DataOptions("textlines:2", max_samples=32, batch_size=16, normalize="inception"))
    xs, ys = zip(*[(x, y) for x, y, *_ in bundle.loader()])
    x, y = torch.cat(xs), torch.cat(ys)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = np.concatenate([session.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))]).astype(np.float64)
    onehot = np.eye(2)[y.numpy()]
    zeta, kappa = float((p ** 2).sum(1).mean()), float((p * onehot).sum(1).mean())
    noise = figures["noise"]
    assert math.isclose(noise["estimate_energy"], zeta, rel_tol=1e-5)
    assert math.isclose(noise["correct_prob"], kappa, rel_tol=1e-5)
    assert math.isclose(noise["noise_fraction"], zeta / (zeta + 1 - 2 * kappa), rel_tol=1e-5)
    ce = float(-np.log(p[np.arange(len(y)), y.numpy()]).mean())
    assert math.isclose(noise["cross_entropy"], ce, rel_tol=1e-5)
    loaded = load_model(path)
    mods = dict(loaded.model.named_modules())
    rows = {r["name"]: r for r in figures["grad_norm"]["layers"]}
    norms = {n: 0.0 for n in rows}
    for i in range(0, len(x), 16):
        loss = F.cross_entropy(loaded.model(x[i:i + 16]), y[i:i + 16])
        grads = torch.autograd.grad(loss, [mods[n].weight for n in rows])
        for n, g in zip(rows, grads):
            norms[n] += g.norm().item() / 2
    assert len(rows) == 54
    for n in rows:
        assert math.isclose(rows[n]["grad_norm"], norms[n], rel_tol=1e-5), n


def test_ppocr_recognises_its_own_task_and_fix_writes_it_back(tmp_path):
    """PP-OCR's direction classifier is in its domain on textlines:2 (well above chance), and a fix of
    the real graph is written back: onnxruntime on the output equals the fixed torch module."""
    from ftdoctor.data import DataOptions, load_data

    path = ppocr_classifier()
    bundle = load_data(DataOptions("textlines:2", split="test", max_samples=128, normalize="inception"))
    x, y = (torch.cat(t) for t in zip(*[(a, b) for a, b, *_ in bundle.loader()]))
    accuracy = float((run_ort(path, x).argmax(1) == y.numpy()).mean())
    assert accuracy > 0.75
    out = tmp_path / "cls.onnx"
    code, stdout, stderr = run_cli("fix", path, "--method", "rescale", "--data", "textlines:2", "--normalize",
                                   "inception", "--max-samples", "64", "-o", out)
    assert code == 0, stdout + stderr
    assert np.abs(run_ort(out, x[:8]) - run_ort(path, x[:8])).max() <= 1e-5


def test_without_the_extra_one_line_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = export(TinyCNN(), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx2torch", None)        # import onnx2torch -> ImportError
    code, _, err = run_cli("inspect", path)
    assert code == 2 and "pip install 'ftdoctor[onnx]'" in err and "Traceback" not in err
