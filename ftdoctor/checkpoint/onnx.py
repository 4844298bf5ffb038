"""ONNX exports in, ONNX out (the ``ftdoctor[onnx]`` extra: onnx, onnx2torch, onnxruntime).

Reading (:mod:`.onnx_read`, called by :func:`~.reading.read_file` for a ``.onnx`` file): a protobuf
parse, never run; external data only from beside the file, bounded; custom operator domains refused
without ``--trust-checkpoint``.

Building (:class:`OnnxSource`): the graph becomes a ``torch.fx.GraphModule`` through ``onnx2torch``, after
three rewrites of a copy of it:

* weights stored as ``Constant`` nodes (opset ≤ 11 exports, PaddlePaddle's) become initializers, which is
  what the converter needs to make ``Conv``/``Gemm`` weights parameters;
* node names become module names (``/layer1/Conv`` → ``layer1_Conv``: no dots or slashes, unique);
* a graph that ends in ``Softmax``/``LogSoftmax`` over the classes loses it, so the probes see its input,
  the logits (one note says so; a written file keeps it); a ``MatMul`` by a constant matrix followed by
  ``Add`` of a constant vector becomes one ``nn.Linear``, so a head exported that way is found as a head.

Every parameter and buffer of the module is mapped to the ONNX tensor it came from (:class:`Mapped`).

Writing (:meth:`OnnxSource.save`, :mod:`.onnx_write`): the file's own graph, with only the tensors a fix changed replaced,
in their stored dtype (a new head also changes the graph output's class dimension); it must pass
``onnx.checker`` and, run by ``onnxruntime``, give the fixed torch module's outputs to 1e-5, or nothing
is written. What a converted model cannot do: it takes one float image batch (N×C×H×W); an operator
onnx2torch does not implement is an error naming it; tensors the converter folds into code (not mapped)
cannot be changed by a fix.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftdoctor.checkpoint.common import Container, LoadedModel, ModelOptions, _quiet, _short
from ftdoctor.checkpoint.onnx_read import (constants_to_initializers, graph_input, is_onnx, name_nodes, opset,
                                          read_onnx)
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.checkpoint.sources import InputSize, ModelSource, loaded, register_model_source
from ftdoctor.errors import FtdoctorError

__all__ = ["Mapped", "OnnxLayout", "OnnxSource", "is_onnx", "read_onnx"]


# ---------------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Mapped:
    """Where a torch tensor of the converted module lives in the graph: the ONNX tensor ``name`` (an
    initializer or a Constant node's value), stored transposed (a MatMul weight) or not."""

    name: str
    transpose: bool = False


@dataclass
class OnnxLayout:
    """What writing a converted model back needs: the file's graph as read, where each torch tensor came
    from, the stripped Softmax (re-applied when verifying), and the input shape the model last ran at."""

    proto: Any
    mapping: dict[str, Mapped]
    #: tensors of the module not mapped to the graph, as built (a fix may not change them)
    unmapped: dict[str, torch.Tensor]
    tail: list[nn.Module]
    input_name: str
    input_dims: list[int | None]
    opset: int
    producer: str
    seen: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        producer = f", made by {self.producer}" if self.producer else ""
        return f"ONNX opset {self.opset}{producer}"


def _convert(path: Path, work: Any) -> torch.fx.GraphModule:
    from onnx2torch import convert

    try:
        with _quiet():
            return convert(work, attach_onnx_mapping=True)
    except NotImplementedError as exc:
        found = re.search(r"operation_type=([^,)]+), version=([^,)]+)", str(exc))
        domain = re.search(r"domain=([^,)]*)", str(exc))
        what = (f"the operator {found.group(1)} (opset {found.group(2)}"
                + (f", domain {domain.group(1)}" if domain and domain.group(1) not in ("''", "") else "") + ")"
                if found else _short(exc))
        raise FtdoctorError(f"{path}: {what} cannot be converted to torch by onnx2torch",
                            "re-export the model without it (another opset, or the operator decomposed); see "
                            "onnx2torch's list of supported operators") from None
    except Exception as exc:  # noqa: BLE001 - the converter's own failures (shapes, attributes)
        raise FtdoctorError(f"{path} could not be converted to torch by onnx2torch: {_short(exc)}",
                            "re-export the model (torch.onnx.export, opset 13 or newer) and try again") from None


def _strip_softmax(gm: torch.fx.GraphModule) -> tuple[list[nn.Module], str | None]:
    """Cut a trailing Softmax/LogSoftmax over the last axis (through Identity nodes) from ``gm``'s graph;
    the modules cut (to re-apply when verifying a written file) and the ONNX operator's name."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    arg = out.args[0]
    if isinstance(arg, (tuple, list)):
        if len(arg) != 1:
            return [], None
        arg = arg[0]
    tail: list[nn.Module] = []
    node = arg
    while isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = type(module).__name__
        if kind in ("OnnxCopyIdentity", "Identity"):
            tail.append(module)
            node = node.args[0]
            continue
        op = _softmax_kind(module)
        if op is None:
            return [], None
        tail.append(module)
        out.args = (node.args[0],)
        graph.eliminate_dead_code()
        gm.recompile()
        return list(reversed(tail)), op
    return [], None


def _softmax_kind(module: nn.Module) -> str | None:
    """``Softmax``/``LogSoftmax`` when ``module`` is one over the last axis of a 2-D output, else None."""
    kind = type(module).__name__
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return kind if module.dim in (-1, 1) else None
    if kind == "OnnxSoftmaxV1V11" and getattr(module, "axis", 1) in (-1, 1):
        return "LogSoftmax" if getattr(module, "is_log", False) else "Softmax"
    return None


def _buffer_names(gm: torch.fx.GraphModule, graph: Any) -> dict[str, str]:
    """``initializers.onnx_initializer_N`` → the ONNX initializer it holds, as onnx2torch numbers them (in node
    order, each initializer input of a node that stays an input)."""
    names = {i.name for i in graph.initializer}
    found, k = {}, 0
    for name, module in gm.named_children():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is None:
            continue
        for value in mapping.inputs:
            if value in names:
                found[f"initializers.onnx_initializer_{k}"] = value
                k += 1
    return found


def _fuse_matmul_add(gm: torch.fx.GraphModule, buffers: dict[str, str], mapping: dict[str, Mapped]) -> None:
    """``MatMul(x, W)`` by a constant 2-D ``W`` followed by ``Add`` of a constant 1-D ``b`` → ``nn.Linear``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)).__name__ != "OnnxMatMul":
            continue
        x, w = node.args
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target in buffers):
            continue
        weight = gm.get_buffer(w.target)
        users = list(node.users)
        if weight.dim() != 2 or len(users) != 1 or users[0].op != "call_module":
            continue
        add = users[0]
        module = gm.get_submodule(add.target)
        fn = getattr(module, "math_op_function", None)
        other = [a for a in add.args if a is not node]
        if fn is not torch.add or len(other) != 1 or not isinstance(other[0], torch.fx.Node) \
                or other[0].op != "get_attr" or other[0].target not in buffers:
            continue
        bias = gm.get_buffer(other[0].target)
        if bias.shape != (weight.shape[1],) or not weight.is_floating_point():
            continue
        linear = nn.Linear(weight.shape[0], weight.shape[1], dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            linear.bias.copy_(bias)
        name = add.target
        gm.add_submodule(name, linear)      # the Add's module name (the node that gives the scores)
        mapping[f"{name}.weight"] = Mapped(buffers[w.target], transpose=True)
        mapping[f"{name}.bias"] = Mapped(buffers[other[0].target])
        add.args, add.kwargs = (x,), {}
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


#: torch tensor → input index of the ONNX node (the modules onnx2torch makes with parameters)
_POSITIONS = {
    "Conv": {"weight": 1, "bias": 2},
    "ConvTranspose": {"weight": 1, "bias": 2},
    "BatchNormalization": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
    "InstanceNormalization": {"weight": 1, "bias": 2},
    "LayerNormalization": {"weight": 1, "bias": 2},
    "Gemm": {"weight": 1, "bias": 2},
}


def _map_tensors(gm: nn.Module, work: Any, buffers: dict[str, str], mapping: dict[str, Mapped]) -> None:
    """Fill ``mapping`` for every parameter and buffer whose ONNX tensor holds exactly its value."""
    from onnx import helper, numpy_helper

    nodes = {n.name: n for n in work.graph.node}
    stored = {i.name: i for i in work.graph.initializer}

    def value(name: str) -> torch.Tensor | None:
        tensor = stored.get(name)
        return None if tensor is None else torch.from_numpy(numpy_helper.to_array(tensor).copy())

    for key, tensor in list(gm.state_dict(keep_vars=True).items()):
        if key in mapping or key.endswith("num_batches_tracked"):
            continue
        if key in buffers:
            mapping[key] = Mapped(buffers[key])
            continue
        owner, _, leaf = key.rpartition(".")
        node = nodes.get(owner)
        index = _POSITIONS.get(node.op_type, {}).get(leaf) if node is not None else None
        if index is None or index >= len(node.input) or not node.input[index]:
            continue
        name = node.input[index]
        transpose = False
        if node.op_type == "Gemm" and leaf == "weight":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            transpose = not attrs.get("transB", 0)
        original = value(name)
        if original is None:
            continue
        original = original.t() if transpose else original
        if original.shape == tensor.shape and torch.equal(original.to(tensor.dtype), tensor.detach()):
            mapping[key] = Mapped(name, transpose)


@register_model_source(name="onnx", priority=12)
class OnnxSource(ModelSource):
    def recognise(self, ckpt: CheckpointFile, opts: ModelOptions) -> Any:
        return True if ckpt.format == "onnx" else None

    def build(self, ckpt: CheckpointFile, opts: ModelOptions, plan: Any, notes: list[str]) -> LoadedModel:
        path, proto = ckpt.path, ckpt.payload
        # onnx2torch's modules index with lists (a torch deprecation warning on every forward): not the user's
        warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
        input_name, dims = graph_input(path, proto)
        work = copy.deepcopy(proto)
        moved = constants_to_initializers(work.graph)
        name_nodes(work.graph)
        gm = _convert(path, work)
        tail, softmax = _strip_softmax(gm)
        buffers = _buffer_names(gm, work.graph)
        mapping: dict[str, Mapped] = {}
        _fuse_matmul_add(gm, buffers, mapping)
        gm = torch.fx.GraphModule(gm, gm.graph)   # submodules registered in graph order: the head is the last
        _map_tensors(gm, work, buffers, mapping)
        unmapped = {k: t.detach().clone() for k, t in gm.state_dict().items() if k not in mapping}
        layout = OnnxLayout(proto, mapping, unmapped, tail, input_name, dims, opset(proto),
                            " ".join(x for x in (proto.producer_name, proto.producer_version) if x))
        gm.register_forward_pre_hook(_Recorder(layout.seen))
        gm.onnx_input_dims = dims
        notes.append(f"{layout.describe()}, converted by onnx2torch"
                     + (f"; {moved} Constant nodes read as weights" if moved else ""))
        if softmax:
            notes.append(f"the graph ends in {softmax}: ftdoctor measures its input, the logits (a written file "
                         f"keeps the {softmax})")
        if opts.arch is not None:
            notes.append(f"--arch {opts.arch} ignored: an ONNX file carries its own graph")
        arch = f"onnx:{proto.graph.name or path.stem}"
        return loaded(ckpt, gm, "onnx", arch, Container("onnx", graph=layout), opts, notes, self.name)

    def input_size(self, arch: str | None, model: nn.Module) -> InputSize | None:
        """A graph with a fixed square H×W runs at that size only."""
        dims = getattr(model, "onnx_input_dims", None) or [None] * 4
        h, w = dims[2], dims[3]
        if h is not None and h == w:
            return InputSize(pretrained=h, exact=h, why=f"the ONNX graph's input is fixed at {h}×{w}")
        return None

    def save(self, loaded: LoadedModel, model: nn.Module, out: Path) -> str:
        from ftdoctor.checkpoint.common import sha256_file
        from ftdoctor.checkpoint.onnx_write import updated_proto, verify
        from ftdoctor.outputs import atomic_write

        layout: OnnxLayout = loaded.container.graph
        proto = updated_proto(loaded, model, layout)
        data = proto.SerializeToString()

        def writer(tmp: Path) -> None:
            tmp.write_bytes(data)
            verify(loaded.path, tmp, model, layout)

        return sha256_file(atomic_write(out, writer))


class _Recorder:
    """Forward pre-hook: the per-example shape of the last input (what a written file is verified at)."""

    def __init__(self, seen: dict[str, Any]) -> None:
        self.seen = seen

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            self.seen["shape"] = tuple(args[0].shape[1:])


