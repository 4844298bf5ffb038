"""Writing a converted ONNX model back: the file's own graph with only the changed tensors replaced, verified
by ``onnx.checker`` and onnxruntime before it is made final (:mod:`.onnx`)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftdoctor.checkpoint.common import LoadedModel, _short
from ftdoctor.checkpoint.onnx_read import INSTALL
from ftdoctor.errors import FtdoctorError

if TYPE_CHECKING:
    from ftdoctor.checkpoint.onnx import OnnxLayout

#: how closely onnxruntime on a written file must give the torch module's outputs (relative to their scale)
TOLERANCE = 1e-5


def updated_proto(loaded: LoadedModel, model: nn.Module, layout: OnnxLayout) -> Any:
    """A copy of the file's graph with every tensor ``model`` changed replaced (same name, stored dtype)."""
    from onnx import numpy_helper

    proto = copy.deepcopy(layout.proto)
    holders = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            holders.setdefault(node.output[0], node.attribute[0].t)
    state = model.state_dict()
    head = loaded.head_key or ""
    resized: list[str] = []
    for key, tensor in state.items():
        place = layout.mapping.get(key)
        if place is None:
            before = layout.unmapped.get(key)
            if key.endswith("num_batches_tracked") or (before is not None and before.shape == tensor.shape
                                                       and torch.equal(before, tensor.detach().cpu())):
                continue
            raise FtdoctorError(f"the fix changed {key}, which the ONNX graph does not hold as a tensor, so it "
                                "cannot be written back; nothing was written",
                                "fix the original torch checkpoint instead, or report the graph to ftdoctor")
        stored = holders[place.name]
        original = numpy_helper.to_array(stored)
        value = tensor.detach().cpu()
        value = value.t() if place.transpose else value
        array = value.numpy().astype(original.dtype, copy=False)
        if array.shape == original.shape and (array == original).all():
            continue
        if array.shape != original.shape:
            if key.rpartition(".")[0] != head:
                raise FtdoctorError(f"the fix changed the shape of {key} ({list(original.shape)} → "
                                    f"{list(array.shape)}); only the head may change shape in an ONNX graph",
                                    "report this to ftdoctor")
            resized.append(place.name)
        fresh = numpy_helper.from_array(array, stored.name)
        stored.CopyFrom(fresh)
    if resized:
        from ftdoctor.checkpoint.writing import _head_outputs

        _retarget_output(proto, resized, int(_head_outputs(model, head) or 0))
    return proto


def _retarget_output(proto: Any, resized: list[str], new: int) -> None:
    """A head of ``new`` classes: the graph output's class dimension says so, and shape hints downstream of
    the head's tensors (now stale) are dropped."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream, todo = set(), list(resized)
    while todo:
        for node in consumers.get(todo.pop(), []):
            for name in node.output:
                if name not in downstream:
                    downstream.add(name)
                    todo.append(name)
    kept = [v for v in proto.graph.value_info if v.name not in downstream]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[len(dims) - 1].HasField("dim_value"):
            dims[len(dims) - 1].dim_value = new


def verify(source: Path, written: Path, model: nn.Module, layout: OnnxLayout) -> None:
    """``onnx.checker`` on the written file, then onnxruntime on it against ``model`` (+ the stripped Softmax)."""
    import numpy as np
    import onnx

    try:
        onnx.checker.check_model(str(written))
    except Exception as exc:  # noqa: BLE001 - ValidationError
        raise FtdoctorError(f"the ONNX file written for {source} fails onnx.checker ({_short(exc)}); nothing "
                            "was written", "report this to ftdoctor with the input file") from None
    try:
        import onnxruntime as ort
    except ImportError:
        raise FtdoctorError("writing an ONNX file needs onnxruntime to verify it, which is not installed",
                            f"install it: {INSTALL}") from None
    shape = layout.seen.get("shape") or tuple(d or 32 for d in layout.input_dims[1:])
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, *shape), generator=generator)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(x.to(device=device, dtype=dtype))
            for module in layout.tail:
                want = module(want)
    finally:
        model.train(was)
    want = want.detach().float().cpu().numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(written), options, providers=["CPUExecutionProvider"])
    elem = session.get_inputs()[0].type
    feed = x.numpy().astype(np.float16 if "float16" in elem else np.float64 if "double" in elem else np.float32)
    got = session.run(None, {layout.input_name: feed})[0].astype(np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    error = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if error > TOLERANCE * scale:
        raise FtdoctorError(f"onnxruntime on the ONNX file written for {source} does not give the fixed model's "
                            f"outputs (largest difference {error:.3g}, shape {list(got.shape)} vs "
                            f"{list(want.shape)}); nothing was written", "report this to ftdoctor with the input file")

