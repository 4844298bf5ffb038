"""Where a layer's scale can be undone — the module graph behind Krähenbühl's rescale (§3.2).

Scaling an affine layer ``k`` (weight and bias) by ``r > 0`` scales its output
by ``r``. The network computes the same function if the scale is undone
downstream, which is possible in two places (SPEC §2):

* a **BatchNorm** that the output reaches (in eval its running statistics
  absorb the scale exactly, with its weight corrected for ε);
* the **single affine layer** that consumes the output across a chain of
  positively homogeneous operations (``f(r·x) = r·f(x)`` for ``r > 0``: ReLU,
  LeakyReLU, max/avg pooling, Dropout, Flatten, Identity, reshapes, means):
  its weight is divided by ``r``.

Anything else — a residual sum, a concatenation, another non-linearity, two
consumers, a model output, a module called twice — means the scale cannot be
undone by changing weights, so the layer keeps ``r = 1`` and the reason is
reported. The graph comes from ``torch.fx`` with every affine layer and
normalisation kept as a leaf; a model that does not trace is an exit-2 error.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ftdoctor.errors import FtdoctorError
from ftdoctor.model import AFFINE_TYPES, AffineLayer, is_affine, restore_modes, training_modes

HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.Flatten, nn.Identity)
HOMOGENEOUS_FUNCTIONS = frozenset({
    torch.relu, torch.relu_, F.relu, F.relu_, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.flatten, torch.reshape, torch.mean,
    torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.max_pool1d, torch.max_pool2d,
    torch.max_pool3d, torch.avg_pool1d, torch.nn.functional.max_pool2d_with_indices,
})
HOMOGENEOUS_METHODS = frozenset({
    "relu", "relu_", "view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze",
    "unsqueeze", "mean", "clone"})
_SHAPE_METHODS = frozenset({"size", "dim"})
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Sink:
    """Where layer ``layer``'s scale is undone: ``kind`` "affine" (weight ÷ r) or "batchnorm"."""

    layer: str
    kind: str
    target: str
    via: tuple[str, ...] = ()


@dataclass
class ScalePlan:
    """Which layers can be rescaled, where each undo goes, and why the others cannot."""

    sinks: dict[str, Sink] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)

    @property
    def producer(self) -> dict[str, str]:
        """Consumer affine layer -> the layer whose scale is undone in it (``r_p`` of SPEC §2)."""
        return {s.target: s.layer for s in self.sinks.values() if s.kind == "affine"}


class _LeafTracer(torch.fx.Tracer):
    """Keep affine layers and normalisations whole (they are what we reason about)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_affine(m) or isinstance(m, _BATCHNORMS + _NORM_MODULES + HOMOGENEOUS_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The model's fx graph (a ``GraphModule``'s own: a converted ONNX model), or an exit-2 error saying why it
    cannot be had."""
    if isinstance(model, torch.fx.GraphModule):
        return model.graph
    modes = training_modes(model)
    try:
        model.eval()
        return _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FtdoctorError(
            f"rescale needs the model's module graph, but torch.fx cannot trace {type(model).__name__}: {first}",
            "make the forward traceable (no control flow on tensor values), or use --method entame, rifle or "
            "datadep, which do not need the graph") from None
    finally:
        restore_modes(modes)


def _is_shape_node(n: Any) -> bool:
    if not isinstance(n, torch.fx.Node):
        return True
    if n.op == "call_method" and n.target in _SHAPE_METHODS:
        return True
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in ("shape", "ndim"):
        return True
    if n.op == "call_function" and n.target is operator.getitem:
        return _is_shape_node(n.args[0])
    return False


def _node_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def _describe(n: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module":
        return f"{n.target} ({type(modules[n.target]).__name__})"
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        if n.target in (operator.add, operator.iadd, torch.add):
            return "a sum (residual connection)"
        if n.target in (torch.cat, torch.stack, torch.concat):
            return "a concatenation"
        if n.target in (operator.mul, operator.imul, torch.mul):
            return "a product"
        return f"{name}()"
    if n.op == "call_method":
        if n.target in ("add", "add_"):
            return "a sum (residual connection)"
        return f".{n.target}()"
    if n.op == "output":
        return "the model's output"
    return n.op


def _passes_scale(n: torch.fx.Node, prev: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``n`` is positively homogeneous in ``prev`` (its only tensor input)."""
    others = [a for a in _node_args(n) if a is not prev]
    if not n.args or n.args[0] is not prev or not all(_is_shape_node(a) for a in others):
        return False
    if n.op == "call_module":
        m = modules[n.target]
        return isinstance(m, HOMOGENEOUS_MODULES)
    if n.op == "call_function":
        return n.target in HOMOGENEOUS_FUNCTIONS
    if n.op == "call_method":
        return n.target in HOMOGENEOUS_METHODS
    return False


def _plain_forward(m: nn.Module) -> bool:
    """An affine module whose forward is the stock one (a custom forward may not scale linearly)."""
    for base in AFFINE_TYPES:
        if isinstance(m, base):
            return type(m).forward is base.forward and not m._forward_pre_hooks and not m._forward_hooks
    return False


def plan_rescale(model: nn.Module, layers: Sequence[AffineLayer], head: AffineLayer,
                 graph: torch.fx.Graph | None = None) -> ScalePlan:
    """Find, for every affine layer, where its scale can be undone (or why it cannot)."""
    graph = graph if graph is not None else trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    plan = ScalePlan()
    for layer in layers:
        name = layer.name
        if name == head.name:
            plan.blocked[name] = "the head: its scale is the model's output"
            continue
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            plan.blocked[name] = ("not found in the traced graph" if not nodes
                                  else f"called {len(nodes)} times per forward (shared weights)")
            continue
        if not _plain_forward(layer.module):
            plan.blocked[name] = (f"{type(layer.module).__name__} has its own forward or hooks: scaling its "
                                  "weight may not scale its output")
            continue
        sink, reason = _follow(nodes[0], modules, calls)
        if sink is None:
            plan.blocked[name] = reason
        else:
            plan.sinks[name] = Sink(name, sink[0], sink[1], sink[2])
    return plan


def _follow(start: torch.fx.Node, modules: dict[str, nn.Module],
            calls: dict[str, list[torch.fx.Node]]) -> tuple[tuple[str, str, tuple[str, ...]] | None, str]:
    """Walk from a layer's output to where its scale can be undone; (kind, target, via) or a reason."""
    cur = start
    via: list[str] = []
    while True:
        users = [u for u in cur.users if not _is_shape_node(u)]
        where = f" after {', '.join(via)}" if via else ""
        if not users:
            return None, f"its output{where} is not used by the model"
        if len(users) > 1:
            shown = ", ".join(_describe(u, modules) for u in users[:3])
            return None, f"its output{where} feeds {len(users)} consumers ({shown})"
        u = users[0]
        if u.op == "output":
            return None, f"its output{where} is returned by the model"
        if u.op == "call_module":
            m = modules[str(u.target)]
            target = str(u.target)
            single = len(calls.get(target, [])) == 1
            direct = u.args and u.args[0] is cur and all(a is cur or _is_shape_node(a) for a in _node_args(u))
            if isinstance(m, _BATCHNORMS):
                if not single or not direct:
                    return None, f"its output{where} reaches {target}, a BatchNorm used more than once"
                if not m.track_running_stats or m.running_var is None:
                    return None, f"it feeds {target}, a BatchNorm without running statistics"
                if m.weight is None:
                    return None, (f"it feeds {target}, a BatchNorm without an affine weight to correct ε "
                                  "(the undo would not be exact)")
                return ("batchnorm", target, tuple(via)), ""
            if is_affine(m):
                if not single:
                    return None, f"its output{where} feeds {target}, which is called more than once"
                if not direct:
                    return None, f"its output{where} enters {target} together with other tensors"
                if not _plain_forward(m):
                    return None, (f"its output{where} feeds {target} ({type(m).__name__}), whose own forward "
                                  "(e.g. a feature norm) would not undo a scale in its weight")
                return ("affine", target, tuple(via)), ""
            if isinstance(m, _NORM_MODULES):
                return None, (f"its output{where} reaches {target} ({type(m).__name__}), a normalisation "
                              "without running statistics to absorb the scale")
        if _passes_scale(u, cur, modules):
            via.append(str(u.target) if u.op == "call_module" else _describe(u, modules))
            cur = u
            continue
        return None, f"its output{where} reaches {_describe(u, modules)}, which is not positively homogeneous"


_BLOCKERS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], str | None]]" = weakref.WeakKeyDictionary()


def rescale_blocker(model: nn.Module, layers: Sequence[AffineLayer], head: AffineLayer) -> str | None:
    """Why ``fix --method rescale`` can do nothing for ``model`` (it does not trace, or no layer's scale can be
    undone downstream — a transformer's layers all feed residual sums), or None when some layer can be
    rescaled. Computed once per model and layer set: the probes that would suggest rescale ask it."""
    names = tuple(layer.name for layer in layers)
    cached = _BLOCKERS.get(model)
    if cached is not None and cached[0] == names:
        return cached[1]
    if isinstance(model, torch.jit.ScriptModule):
        reason: str | None = "a TorchScript model has no module graph to rescale along"
    else:
        try:
            plan = plan_rescale(model, layers, head)
        except FtdoctorError:
            reason = f"torch.fx cannot trace {type(model).__name__} (no module graph to rescale along)"
        else:
            reasons = [r for name, r in plan.blocked.items() if name != head.name]
            reason = None
            if not plan.sinks:
                common = max(set(reasons), key=reasons.count) if reasons else "no layer below the head"
                reason = f"no layer's scale can be undone downstream (e.g. {common})"
    _BLOCKERS[model] = (names, reason)
    return reason
