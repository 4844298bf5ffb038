"""Reading an ONNX file as untrusted input, and the protobuf rewrites conversion needs (:mod:`.onnx`).

The protobuf is parsed from the file's bytes, never run; external data is read only from regular files
inside the model's own folder (no absolute path, no ``..``, no link out), within their sizes, and the
tensors are bounded like any checkpoint's (:mod:`ftdoctor.bounds`). A node of an operator domain other
than the standard ones (``ai.onnx``, ``ai.onnx.ml``) is a custom operator, code a runtime would have to
load: refused without ``--trust-checkpoint``.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ftdoctor import bounds
from ftdoctor.checkpoint.common import Container, ModelOptions, _short, _unreadable
from ftdoctor.checkpoint.reading import CheckpointFile
from ftdoctor.errors import FtdoctorError
from ftdoctor.safety import human_bytes, open_regular

INSTALL = "pip install 'ftdoctor[onnx]'"
#: operator domains whose operators are the standard's (anything else is a custom operator: code)
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_PROTOBUF_LIMIT = 2 ** 31 - 1


def onnx_package() -> Any:
    try:
        import onnx
        import onnx2torch  # noqa: F401
    except ImportError:
        raise FtdoctorError("reading an ONNX file needs the onnx and onnx2torch packages, which are not installed",
                            f"install them: {INSTALL}") from None
    return onnx


# ----------------------------------------------------------------------------------------------- reading


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def read_onnx(path: Path, digest: str, size: int, opts: ModelOptions, notes: list[str], scan: Any) -> CheckpointFile:
    """Parse ``path`` into an ``onnx.ModelProto`` (external data read in), refusing custom operators unless
    ``opts.trust_checkpoint``."""
    onnx = onnx_package()
    if size > _PROTOBUF_LIMIT:
        raise _unreadable(path, f"{human_bytes(size)} is more than a protobuf holds (2 GiB)",
                          "export the weights as external data beside the .onnx file")
    with open_regular(path, "the checkpoint") as f:
        data = f.read(size + 1)
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise _unreadable(path, f"not an ONNX model ({_short(exc)})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise _unreadable(path, "the ONNX file holds no graph")
    external = _read_external_data(path, proto)
    total = sum(_tensor_bytes(t) for t in _tensors(proto.graph))
    if total > bounds.TENSOR_RATIO * (size + external) + bounds._SLACK:
        raise FtdoctorError(f"{path} declares {human_bytes(total)} of tensors in {human_bytes(size + external)} of "
                            "files; it was not loaded (an allocation bomb)", "re-export the model from a trusted copy")
    custom = sorted(_custom_domains(proto))
    if custom:
        if not opts.trust_checkpoint:
            raise FtdoctorError(
                f"{path} was not loaded: it uses operators of the custom domain(s) {', '.join(custom)}, which a "
                "runtime implements with code from outside the standard (a library it must load)",
                "pass --trust-checkpoint only if you trust where this file comes from; re-export with standard "
                "operators to have ftdoctor convert it")
        notes.append(f"loaded with --trust-checkpoint although it uses custom operator domain(s) {', '.join(custom)}")
    return CheckpointFile(path, digest, size, proto, Container("onnx"), notes, scan)


def external_files(path: Path) -> set[str]:
    """The file names ``path``'s tensors keep their external data in (empty when it cannot be read)."""
    try:
        onnx = onnx_package()
        size = path.stat().st_size
        if size > _PROTOBUF_LIMIT:
            return set()
        with open_regular(path, "the checkpoint") as f:
            proto = onnx.ModelProto.FromString(f.read(size + 1))
    except Exception:  # noqa: BLE001 - not readable: check reports the model itself
        return set()
    return {e.value for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _subgraphs(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs (If, Loop, Scan bodies)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _nodes(sub)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every stored tensor: initializers and Constant values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for sub in _subgraphs(node):
            yield from _tensors(sub)


def _tensor_bytes(tensor: Any) -> int:
    n = 1
    for d in tensor.dims:
        n *= max(int(d), 0)
    return n * 4 if not tensor.raw_data else max(n, len(tensor.raw_data))


def _custom_domains(proto: Any) -> set[str]:
    found = {n.domain for n in _nodes(proto.graph)}
    for function in proto.functions:
        found.add(function.domain)
        found.update(n.domain for n in function.node)
    return {d for d in found if d not in STANDARD_DOMAINS}


def _read_external_data(path: Path, proto: Any) -> int:
    """Read every tensor's external data into ``raw_data``; the bytes read. Only regular files inside the
    model's folder, each range within its file."""
    onnx = onnx_package()
    folder = Path(os.path.realpath(path.parent))
    total = 0
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = Path(os.path.realpath(folder / location))
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or folder not in target.parents:
            raise FtdoctorError(f"{path}: the tensor {tensor.name!r} keeps its data in {location!r}, outside the "
                                "model's folder; it was not read",
                                "keep external data files beside the .onnx file (onnx.save_model(..., "
                                "save_as_external_data=True, location='NAME'))")
        try:
            offset, length = int(info.get("offset", 0)), info.get("length")
            with open_regular(target, "external ONNX data") as f:
                file_size = os.fstat(f.fileno()).st_size
                length = file_size - offset if length is None else int(length)
                if offset < 0 or length < 0 or offset + length > file_size:
                    raise ValueError(f"bytes {offset}..{offset + length} of a {file_size}-byte file")
                f.seek(offset)
                tensor.raw_data = f.read(length)
        except (OSError, ValueError) as exc:
            raise _unreadable(path, f"the external data of tensor {tensor.name!r} in {location} is unusable "
                                    f"({_short(exc)})") from None
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        total += length
    return total


# ------------------------------------------------------------------------------------- rewrites


def opset(proto: Any) -> int:
    return max((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def constants_to_initializers(graph: Any) -> int:
    """Move ``Constant`` nodes holding a tensor into the graph's initializers; how many moved."""
    import numpy as np
    from onnx import helper, numpy_helper

    kept, moved = [], 0
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            kept.append(node)
            continue
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            tensor = copy.deepcopy(value)
        elif attr.name in ("value_float", "value_floats"):
            tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32))
        elif attr.name in ("value_int", "value_ints"):
            tensor = numpy_helper.from_array(np.asarray(value, dtype=np.int64))
        else:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def name_nodes(graph: Any) -> None:
    """Module names from node names: only ``[A-Za-z0-9_@-]``, never empty, unique."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        base = re.sub(r"[^A-Za-z0-9_@-]+", "_", node.name).strip("_") or f"{node.op_type}_{i}"
        if base[0].isdigit() or base == "initializers":
            base = f"{node.op_type}_{base}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        node.name = name


def graph_input(path: Path, proto: Any) -> tuple[str, list[int | None]]:
    onnx = onnx_package()
    stored = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in stored]
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type not in floats or \
            len(inputs[0].type.tensor_type.shape.dim) != 4:
        described = ", ".join(f"{i.name} (rank {len(i.type.tensor_type.shape.dim)})" for i in inputs) or "none"
        raise FtdoctorError(f"{path} takes {described}: ftdoctor reads ONNX image classifiers, one float input "
                            "N×C×H×W", "export the model with a single image input (and its preprocessing outside)")
    if len(proto.graph.output) != 1:
        raise FtdoctorError(f"{path} has {len(proto.graph.output)} outputs: ftdoctor reads classifiers with one "
                            "output, the class scores", "export the model with the scores as its only output")
    dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


