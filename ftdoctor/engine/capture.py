"""The forward and tensor hooks that collect what the probes asked for from one forward pass.

On the CPU the per-example totals (``squares = "totals"``, :mod:`ftdoctor.engine.ghost`) are formed when they
are read (:attr:`Capture.grad_sq`), after the backward, from the layer inputs and output gradients its hooks
held (:data:`DEFER_BYTES`): formed in the hooks, each layer's few small products ran among the backward's
own kernels, which had pushed their code and data out of the caches (two cores, BERT-mini at a batch of
64: the same products took 1.2–1.3× as long in the hooks; a measuring step of the live monitor 0.01–0.05
of a plain step less, resnet18 at 32×32 0.03–0.05). A large gradient is read in its hook, while the
backward has just written it: only layers up to :data:`DEFER_LAYER_BYTES` are held (a 4-layer BERT of
width 256 on 128 tokens, 8–32 MB a layer, gained nothing from holding them).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ftdoctor.engine import ghost, persample
from ftdoctor.model import AffineLayer

_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)

#: the output gradients a backward's hooks may hold on the CPU for the per-example totals, formed when the
#: backward is done (bytes, in all and for one layer; beyond them, and on a GPU, where a hook only queues
#: its kernels, a layer's total is formed in its hook, while its gradient is still in the caches)
DEFER_BYTES = 64 * 2**20
DEFER_LAYER_BYTES = 4 * 2**20


def _labelled(label: str) -> contextlib.AbstractContextManager:
    """``torch.profiler.record_function(label)`` while a profiler runs, else nothing: the label costs a
    few microseconds on each of a backward's dozens of layer hooks even when nobody records it."""
    return torch.profiler.record_function(label) if _profiling() else contextlib.nullcontext()


class Capture:
    """Forward/tensor hooks that collect what the probes need from one forward."""

    def __init__(self, layers: Sequence[AffineLayer], head: AffineLayer, *, grad_sq: bool,
                 outputs: bool, head_input: bool) -> None:
        self.layers = list(layers)
        self.head = head
        self.want_grad_sq = grad_sq
        self.want_outputs = outputs
        self.want_head_input = head_input
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.head_input: Tensor | None = None
        self._grad_sq: dict[str, Tensor] = {}
        self._pending: list[tuple[str, nn.Module, Tensor, Tensor, float]] = []   # totals to form (grad_sq)
        self._pending_bytes = 0
        self.phase: str | None = None      # which backward the tensor hooks serve
        self.grad_scale = 1.0
        # "elements": Σ_n (∂ℓ_n/∂W)² shaped like the weight; "totals": its sum alone, Σ_n ‖∂ℓ_n/∂W‖² (a float64
        # scalar, engine.ghost: the change rate without the cv, for less)
        self.squares = "elements"
        # a probe's running sum to add a layer's squares into in place, or None (grad_sq_sum's out=)
        self.grad_sq_sink: Callable[[str, torch.dtype], Tensor | None] | None = None
        # roots: set find_roots, and input_leaf (the model's input, requiring grad; None for token ids or a
        # mapping of inputs), before the forward
        self.find_roots = False
        self.input_leaf: Tensor | None = None
        self.root_edges: list[GradientEdge] = []
        self._out_edges: dict[str, GradientEdge] = {}   # each hooked layer's output, for late()
        self._stops: set[Node] = set()     # this forward's affine outputs
        self._dead: set[Node] = set()      # nodes known not to reach the input past no affine output
        self._owner = threading.get_ident()   # hooks fired on another thread are not this pass's
        self.unsupported: dict[str, str] = {}
        # outputs: kept as they are, not copied, when a pristine copy of the input lets the forward run again
        # (keep_without_copy): only the layers whose output a later op of the forward changed in place are
        # copied — the first batch copies all and finds them by version counter, later batches check
        # (outputs_intact)
        self.keep_without_copy = False
        self.copied_outputs: set[str] | None = None    # None: not known yet
        self._kept: dict[str, tuple[Tensor, int]] = {}   # each kept output and its version then
        self.recapturing = False    # the forward again, copying every output (outputs_intact)
        self.batch_size: int | None = None   # examples in this forward (set per batch by the stream)
        self._grams = ghost.InputGram()      # a linear input's Gram, for the next layer reading it (totals)
        self._handles: list = []
        if grad_sq:
            for layer in self.layers:
                reason = persample.supports(layer.module)
                if reason:
                    self.unsupported[layer.name] = reason

    @property
    def grad_sq(self) -> dict[str, Tensor]:
        """Each layer's per-example squares of the last backward (its held totals formed now)."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            with _labelled("ftdoctor.per_example_norms"):
                for name, module, x, g, scale in pending:
                    self._grad_sq[name] = self._total(module, x, g, scale)
        return self._grad_sq

    @grad_sq.setter
    def grad_sq(self, value: dict[str, Tensor]) -> None:
        self._pending, self._pending_bytes = [], 0
        self._grad_sq = value

    def _total(self, module: nn.Module, x: Tensor, g: Tensor, scale: float) -> Tensor:
        return ghost.grad_norm_sq_sum(module, x, g * scale if scale != 1.0 else g, self._grams)[0]

    def __enter__(self) -> "Capture":
        if not (self.want_grad_sq or self.want_outputs or self.want_head_input):
            return self      # nothing to collect (and a TorchScript model takes no hooks)
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self._kept.clear()
        self.calls.clear()
        self.grad_sq = {}
        self.head_input = None
        self.forget_graph()

    def forget_graph(self) -> None:
        """Drop what refers to this forward's autograd graph (once its backward passes are done)."""
        self.find_roots = False
        self.input_leaf = None
        self.root_edges = []
        self._out_edges = {}
        self._stops.clear()
        self._dead.clear()
        self._grams.clear()

    def late(self) -> list[GradientEdge]:
        """The outputs of the layers whose per-example squares a backward to :attr:`root_edges` did not
        reach (their hooks have not fired): without an input leaf, a layer fed by the input only through
        something that is not an affine layer (a functional embedding) lies above no root. A layer called
        more than once is not one of them: its squares are never formed (its hook leaves its input)."""
        return [self._out_edges[name] for name in self.inputs
                if name in self._out_edges and self.calls.get(name, 0) == 1]

    def _is_root(self, out_node: Node) -> bool:
        """Whether the layer whose output's node is ``out_node`` reads :attr:`input_leaf` through no
        other affine layer's output.

        Walks the autograd graph from that node's inputs (whatever argument carried the input)
        towards the leaves, stopping at the outputs of the affine layers that ran before. Nodes
        found not to reach the input are remembered for the rest of this forward, so walks that
        fail never repeat one another's work (a successful walk ends at the input, near by).
        """
        stack = [n for n, _ in out_node.next_functions if n is not None]
        seen: set[Node] = set()
        while stack:
            node = stack.pop()
            if node in seen or node in self._stops or node in self._dead:
                continue
            if getattr(node, "variable", None) is self.input_leaf:   # the input's AccumulateGrad
                return True
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions if n is not None)
        self._dead |= seen
        return False

    def _hook(self, layer: AffineLayer) -> Callable:
        name, module = layer.name, layer.module
        is_head = name == self.head.name

        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if threading.get_ident() != self._owner:   # e.g. a reference reaching the model's modules
                return
            if self.recapturing:
                self.outputs[name] = out.detach().clone()
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            x = args[0] if args else None
            if is_head and self.want_head_input and x is not None:
                self.head_input = x.detach()
            if self.want_outputs:
                self._keep_output(name, out)
            if self.want_grad_sq and isinstance(out, Tensor) and out.requires_grad:
                # taken now: an in-place op after the layer would move the tensor's own edge
                edge = get_gradient_edge(out)
                # a root: reads nothing differentiable (the input, token ids into an embedding), or reads
                # the input leaf through no other affine layer
                if self.find_roots and (not (isinstance(x, Tensor) and x.requires_grad)
                                        or (self.input_leaf is not None and self._is_root(edge.node))):
                    self.root_edges.append(edge)
                self._stops.add(edge.node)
                # a layer called on something not batched like the examples (BERT's position embeddings,
                # broadcast over the batch) has no per-example gradient in its own output gradient
                batched = (self.batch_size is None or (isinstance(x, Tensor) and x.dim() > 0
                                                       and x.shape[0] == self.batch_size))
                if name not in self.unsupported and x is not None and batched:
                    self.inputs[name] = x.detach()
                    self._out_edges[name] = edge
                    out.register_hook(self._grad_hook(name, module))
        return hook

    def _keep_output(self, name: str, out: Tensor) -> None:
        copy = not (self.keep_without_copy and self.copied_outputs is not None and name not in self.copied_outputs)
        # a copy where an in-place op after the layer (a ReLU(inplace=True)) would overwrite the output
        self.outputs[name] = out.detach().clone() if copy else out.detach()
        if self.keep_without_copy:
            self._kept[name] = (out, out._version)

    def outputs_intact(self) -> bool:
        """After the forward: whether every output kept without a copy is as the layer produced it.

        A layer's output that a later op of this forward changed in place is copied from the next
        batch on; when it was kept without a copy this time (the model changes it only on some
        inputs), this returns False and the caller runs the forward again under :attr:`recapturing`.
        """
        changed = {name for name, (out, version) in self._kept.items() if out._version != version}
        self._kept.clear()
        lost = changed - self.copied_outputs if self.copied_outputs is not None else set()
        self.copied_outputs = (self.copied_outputs or set()) | changed
        return not lost

    def _grad_hook(self, name: str, module: nn.Module) -> Callable[[Tensor], None]:
        def on_grad(g: Tensor) -> None:
            if self.phase != "grad_sq" or self.calls.get(name, 0) != 1:
                return
            x = self.inputs.pop(name, None)
            if x is None:
                return
            if self.squares == "totals":
                size = g.numel() * g.element_size()
                if (g.device.type == "cpu" and size <= DEFER_LAYER_BYTES
                        and self._pending_bytes + size <= DEFER_BYTES):
                    self._pending.append((name, module, x, g, self.grad_scale))
                    self._pending_bytes += size
                    return
                with _labelled("ftdoctor.per_example_norms"):
                    self._grad_sq[name] = self._total(module, x, g, self.grad_scale)
                return
            if self.grad_scale != 1.0:
                g = g * self.grad_scale
            dtype = persample.computation_dtype(x, g)
            sink = self.grad_sq_sink(name, dtype) if self.grad_sq_sink is not None else None
            with _labelled("ftdoctor.per_example_squares"):
                w, _ = persample.grad_sq_sum(module, x, g, out=sink)
            self._grad_sq[name] = w if w is sink else w.detach()   # the sink itself: the probe knows it
        return on_grad
