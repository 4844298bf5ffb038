"""The single streaming pass that serves every probe (SPEC §7).

Per batch: one forward pass of the model in eval mode, at most two backward
passes — the random linear loss ``Σ_n η_n·logits_n`` (Krähenbühl et al. §3)
and the mean cross-entropy with the labels (RIFLE §4.6.1) — and one forward
pass of the reference model when R² is asked (after the backward passes, so
what it keeps never coexists with the autograd graph, or on a second thread
during them when a core is idle: :func:`overlap_allowed`). What each backward yields is
decided by what the probes declared in :attr:`Probe.needs`:

* ``grad_sq`` — Σ_n (∂ℓ_n/∂W)², per example, batched from each affine layer's
  input (forward hook) and the gradient at its output (tensor hook), no loop
  over examples (:mod:`ftdoctor.probes.persample`). For the random loss the
  backward asks autograd only for the gradients at the outputs of the *root*
  layers — those fed by the model's input through no other affine layer — so
  it forms no weight gradient and no gradient below them (resnet18's first
  convolution would cost 10 ms a batch for a 3-channel input gradient nobody
  reads). Every layer whose output depends on the input lies on a path from
  the loss to a root; a layer whose output does not (e.g. a Linear on learned
  queries) is listed in ``skipped``.
* ``rand_grads`` / ``ce_grads`` — batch gradients of the affine weights.

The model is left as it was: hooks removed, the train/eval flags and
``requires_grad`` flags restored, no ``.grad`` touched (``torch.autograd.grad``
does not accumulate), parameters and buffers untouched (eval mode does not
update BatchNorm statistics).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ftdoctor.errors import FtdoctorError
from ftdoctor.model import AffineLayer
from ftdoctor.probes import persample
from ftdoctor.probes.base import Batch, Probe
from ftdoctor.rng import example_normals
from ftdoctor import progress as _progress


@dataclass(frozen=True)
class PassSettings:
    """How the shared backward passes are formed."""

    seed: int = 0
    change_rate_mode: str = "exact"    # exact | batch
    change_rate_loss: str = "random"   # random | ce


@contextlib.contextmanager
def preserved(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``params`` for the pass; everything restored after."""
    modes = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in params]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)


class _Capture:
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
        self.grad_sq: dict[str, Tensor] = {}
        self.phase: str | None = None      # which backward the tensor hooks serve
        self.grad_scale = 1.0
        # a probe's running sum to add a layer's squares into in place, or None (grad_sq_sum's out=)
        self.grad_sq_sink: Callable[[str, torch.dtype], Tensor | None] | None = None
        # roots: set input_leaf (the model's input, requiring grad) before the forward
        self.input_leaf: Tensor | None = None
        self.root_edges: list[GradientEdge] = []
        self._stops: set[Node] = set()     # this forward's affine outputs
        self._dead: set[Node] = set()      # nodes known not to reach the input past no affine output
        self._owner = threading.get_ident()   # hooks fired on another thread are not this pass's
        self.unsupported: dict[str, str] = {}
        self._handles: list = []
        if grad_sq:
            for layer in self.layers:
                reason = persample.supports(layer.module)
                if reason:
                    self.unsupported[layer.name] = reason

    def __enter__(self) -> "_Capture":
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
        self.calls.clear()
        self.grad_sq = {}
        self.head_input = None
        self.forget_graph()

    def forget_graph(self) -> None:
        """Drop what refers to this forward's autograd graph (once its backward passes are done)."""
        self.input_leaf = None
        self.root_edges = []
        self._stops.clear()
        self._dead.clear()

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
            self.calls[name] = self.calls.get(name, 0) + 1
            x = args[0] if args else None
            if is_head and self.want_head_input and x is not None:
                self.head_input = x.detach()
            if self.want_outputs:
                # clone: an in-place activation after the layer would overwrite it
                self.outputs[name] = out.detach().clone()
            if self.want_grad_sq and isinstance(out, Tensor) and out.requires_grad:
                # taken now: an in-place op after the layer would move the tensor's own edge
                edge = get_gradient_edge(out)
                if self.input_leaf is not None and self._is_root(edge.node):
                    self.root_edges.append(edge)
                self._stops.add(edge.node)
                if name not in self.unsupported and x is not None:
                    self.inputs[name] = x.detach()
                    out.register_hook(self._grad_hook(name, module))
        return hook

    def _grad_hook(self, name: str, module: nn.Module) -> Callable[[Tensor], None]:
        def on_grad(g: Tensor) -> None:
            if self.phase != "grad_sq" or self.calls.get(name, 0) != 1:
                return
            x = self.inputs.pop(name, None)
            if x is None:
                return
            if self.grad_scale != 1.0:
                g = g * self.grad_scale
            dtype = persample.computation_dtype(x, g)
            sink = self.grad_sq_sink(name, dtype) if self.grad_sq_sink is not None else None
            w, _ = persample.grad_sq_sum(module, x, g, out=sink)
            self.grad_sq[name] = w if w is sink else w.detach()   # the sink itself: the probe knows it
        return on_grad


def _affine_params(layers: Sequence[AffineLayer]) -> list[Tensor]:
    params: list[Tensor] = []
    for layer in layers:
        params.append(layer.weight)
        if layer.bias is not None:
            params.append(layer.bias)
    return params


def _grads_by_layer(layers: Sequence[AffineLayer], grads: Sequence[Tensor]) -> dict[str, tuple[Tensor, Tensor | None]]:
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    it = iter(grads)
    for layer in layers:
        gw = next(it)
        gb = next(it) if layer.bias is not None else None
        out[layer.name] = (gw, gb)
    return out


def check_logits(logits: object, y: Tensor, num_classes: int) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise FtdoctorError(f"the model's output has shape {shape}, not (batch, classes)",
                            "ftdoctor probes classifiers whose forward returns one logit row per example")
    if logits.shape[1] != num_classes:
        raise FtdoctorError(
            f"the model has {logits.shape[1]} outputs but the data has {num_classes} classes",
            "pass --new-head to attach a fresh head for the data's classes, or use matching data")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise FtdoctorError(f"a label ({int(y.max())}) is out of range for {logits.shape[1]} outputs",
                            "check the dataset's labels or the model's class count")
    return logits


def run_pass(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor, int]], probes: Sequence[Probe],
             layers: Sequence[AffineLayer], head: AffineLayer, num_classes: int,
             settings: PassSettings, *, reference: nn.Module | None = None,
             reference_pairs: Sequence[tuple[AffineLayer, AffineLayer]] = (),
             device: torch.device | str = "cpu", total: int | None = None,
             description: str = "probing",
             all_reduce: Callable[[Tensor], Tensor] | None = None) -> int:
    """Stream ``batches`` once through ``model`` and feed every probe; returns the number of examples.

    ``batches`` yields ``(x, y, index, global_batch_size)``: this process's share of each global
    batch (all of it in a single process). Batch gradients are formed from the loss of the global
    batch — local sums divided by the global size — and summed across processes with
    ``all_reduce`` before the probes see them, so every figure is the single-process one.
    """
    needs = frozenset().union(*(p.needs for p in probes)) if probes else frozenset()
    want_grad_sq = "grad_sq" in needs
    loss_kind = settings.change_rate_loss
    exact = settings.change_rate_mode == "exact"
    need_rand = ("rand_grads" in needs) or (want_grad_sq and loss_kind == "random")
    rand_weight_grads = need_rand and not (want_grad_sq and loss_kind == "random" and exact)
    need_ce = ("ce_grads" in needs) or (want_grad_sq and loss_kind == "ce")
    need_graph = need_rand or need_ce
    params = _affine_params(layers)
    ref_pairs = list(reference_pairs)
    seen = 0
    with preserved(model, params if need_graph else []), \
            _Capture(layers, head, grad_sq=want_grad_sq, outputs="outputs" in needs,
                     head_input="head_input" in needs) as cap, \
            _reference_capture(reference, ref_pairs, reference is not None and need_graph and all_reduce is None
                               and overlap_allowed(model, reference, device)) as ref_cap, \
            _progress.task(description, total, "examples") as bar:
        # one probe takes the per-example squares: it may have them added into its running sums
        takers = [p for p in probes if "grad_sq" in p.needs]
        if len(takers) == 1 and hasattr(takers[0], "grad_sq_sink"):
            cap.grad_sq_sink = takers[0].grad_sq_sink
        # the one probe comparing outputs may reduce pairs during the reference's forward
        pairers = [p for p in probes if "outputs" in p.needs]
        if ref_cap is not None and len(pairers) == 1 and hasattr(pairers[0], "take_pair"):
            ref_cap.taker = pairers[0]
        for x, y, idx, global_size in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            cap.clear()
            batch = Batch(x=x, y=y, index=idx, logits=torch.empty(0, num_classes, device=device),
                          global_size=int(global_size))
            rand_g: Sequence[Tensor | None] | None = None
            ce_g: Sequence[Tensor | None] | None = None
            if batch.size:
                # the reference sees the batch as loaded, even if the model's forward changes its input in place
                x_ref = x.clone() if ref_cap is not None else None
                x_in = x.detach().requires_grad_(True) if need_rand and not rand_weight_grads else x
                cap.input_leaf = x_in if x_in is not x else None
                with torch.set_grad_enabled(need_graph):
                    logits = model(x_in)
                check_logits(logits, y, num_classes)
                batch.logits = logits.detach()
                if ref_cap is not None:
                    # the model's outputs as of its own forward (a copy: a shared module's hook would
                    # overwrite the capture's during the reference's forward)
                    batch.outputs = ref_cap.model_outputs = dict(cap.outputs)
                    ref_cap.model_calls = dict(cap.calls)
                    ref_cap.start(x_ref)   # overlaps the backward passes when allowed, else a no-op
                clock = (time.perf_counter(), time.process_time())
                if need_rand:
                    eta = example_normals(settings.seed, idx, logits.shape[1]).to(logits.device, logits.dtype)
                    loss_r = (eta * logits).sum()
                    if rand_weight_grads:
                        cap.phase = None
                        rand_g = torch.autograd.grad(loss_r, params, retain_graph=need_ce, allow_unused=True)
                    else:
                        # only the gradients at the root layers' outputs are asked for: autograd forms
                        # no weight gradient, the tensor hooks see every layer's output gradient on the way
                        cap.phase, cap.grad_scale = "grad_sq", 1.0
                        torch.autograd.grad(loss_r, cap.root_edges or [x_in], retain_graph=need_ce,
                                            allow_unused=True)
                        batch.grad_sq, cap.grad_sq = cap.grad_sq, {}
                if need_ce:
                    # the global batch's mean CE: local sum / global size (DDP's averaging)
                    loss_ce = F.cross_entropy(logits, y, reduction="sum") / global_size
                    ce_sq = want_grad_sq and loss_kind == "ce"
                    # per-example terms CE_n = global_size · (this loss's share): scale the output gradient
                    cap.phase, cap.grad_scale = ("grad_sq", float(global_size)) if ce_sq else (None, 1.0)
                    ce_g = torch.autograd.grad(loss_ce, params, allow_unused=True)
                    if ce_sq:
                        batch.grad_sq, cap.grad_sq = cap.grad_sq, {}
                cap.phase = None
                # the graph below the roots never ran, so nothing freed it: drop what holds it
                loss_r = loss_ce = eta = None
                cap.forget_graph()
                if ref_cap is not None:
                    ref_cap.measured(*clock)
                batch.head_input = cap.head_input
                if ref_cap is None:
                    batch.outputs = dict(cap.outputs)
                del logits
                if ref_cap is not None:
                    # in line, after the backward passes (the reference's outputs then never coexist with
                    # the graph), unless start() overlapped it with them
                    batch.ref_outputs = ref_cap.finish(x_ref)
            if rand_weight_grads:
                batch.rand_grads = _grads_by_layer(layers, _reduce_grads(params, rand_g, all_reduce))
            if need_ce:
                batch.ce_grads = _grads_by_layer(layers, _reduce_grads(params, ce_g, all_reduce))
            for probe in probes:
                probe.update(batch)
            seen += batch.size
            bar.advance(int(global_size))
            del batch
    return seen


def _reduce_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None] | None,
                  all_reduce: Callable[[Tensor], Tensor] | None) -> list[Tensor]:
    """Fill missing gradients with zeros and sum them over processes in one flat all-reduce."""
    full = [torch.zeros_like(p) if grads is None or grads[i] is None else grads[i].detach()
            for i, p in enumerate(params)]
    if all_reduce is None:
        return full
    flat = all_reduce(torch.cat([g.reshape(-1) for g in full]))
    out, offset = [], 0
    for g in full:
        out.append(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return out


# The reference's outputs may coexist with the autograd graph (overlapped forward) up to this size...
_OVERLAP_BYTES = 512 * 2**20
# ...and the backward passes must leave at least this much of the machine idle (two threads on two
# cores, measured: resnet18 at 32×32 leaves 0.41–0.56 of a core idle and gains 0.2 of a training step;
# the VGG-style net's grouped-convolution kernels leave 0.20–0.32 and lose 0.05).
_OVERLAP_SPARE_CORES = 0.35


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def overlap_allowed(model: nn.Module, reference: nn.Module, device: torch.device | str) -> bool:
    """Whether the reference's forward may run on a second thread during the backward passes.

    The per-example squares are batched small matrix products that leave much of a second core idle
    (resnet18: 1.0–1.3× faster on two threads than on one); the reference's forward fills it
    (resnet18 at 32×32, two threads: 2.51× → 2.31× a training step with ``--reference``). Only on
    the CPU; only when OpenMP's waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``) or torch runs one
    thread — with spinning waits two thread teams fight for the cores (measured 2.44× → 2.60×) —
    and only when the reference shares no module with the model (their hooks would cross). The pass
    also keeps it in line without a backward pass to overlap and under ``torchrun`` (the other ranks
    hold the other cores).
    """
    if torch.device(device).type != "cpu":
        return False
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    if not (passive or torch.get_num_threads() == 1):
        return False
    mine = {id(m) for m in model.modules()}
    return not any(id(m) in mine for m in reference.modules())


class _RefCapture:
    def __init__(self, reference: nn.Module, pairs: Sequence[tuple[AffineLayer, AffineLayer]],
                 overlap: bool = False) -> None:
        self.reference = reference
        self.pairs = pairs
        self.outputs: dict[str, Tensor] = {}
        self.overlap = overlap
        # the probe that reduces a (model output, reference output) pair in the hook (take_pair),
        # and the model's outputs of the batch for it
        self.taker: Probe | None = None
        self.model_outputs: dict[str, Tensor] = {}
        # layers whose pairs may be taken in the hook: called once per forward on both sides (the
        # first batch, in line and copying everything, finds them; see run)
        self.takeable: frozenset[str] = frozenset()
        self.model_calls: dict[str, int] = {}     # the model's calls per layer in this batch's forward
        self._calls: dict[str, int] = {}
        self._taken: set[str] = set()
        self._running = False
        self.last_bytes: int | None = None    # the previous batch's outputs: small enough to overlap?
        self.spare: float | None = None       # cores the second batch's backward passes left idle
        self._batches = 0
        self._thread: threading.Thread | None = None
        self._result: dict[str, Tensor] | BaseException | None = None
        self._handles = []
        self._modes = {m: m.training for m in reference.modules()}
        reference.eval()
        for mine, ref in pairs:
            self._handles.append(ref.module.register_forward_hook(self._hook(mine.name)))

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if not self._running:    # a module shared with the model, firing in the model's forward
                return
            self._calls[name] = self._calls.get(name, 0) + 1
            if name in self._taken:
                return    # called again in this forward: the first call's pair was taken (see run)
            a = self.model_outputs.get(name)
            if (self.taker is not None and name in self.takeable and a is not None
                    and isinstance(out, Tensor) and self.taker.take_pair(name, a, out.detach())):
                self._taken.add(name)
                return    # reduced now, before any in-place op after the layer: no copy kept
            self.outputs[name] = out.detach().clone()
        return hook

    def run(self, x: Tensor) -> dict[str, Tensor]:
        """The reference's affine outputs for ``x`` that no taker consumed, handed over (the capture
        keeps no reference)."""
        self.outputs, self._calls, self._taken = {}, {}, set()
        self._running = True
        try:
            with torch.no_grad():
                self.reference(x)
        finally:
            self._running = False
        outputs, self.outputs = self.outputs, {}
        if self.taker is not None and self.last_bytes is None:
            # from the first batch on: a layer called more than once (on either side) keeps the old
            # way, its last call's copy, as update() expects
            self.takeable = frozenset(n for n, c in self._calls.items()
                                      if c == 1 and self.model_calls.get(n) == 1)
        self.model_outputs = {}
        self.last_bytes = sum(t.numel() * t.element_size() for t in outputs.values())
        return outputs

    def measured(self, wall0: float, cpu0: float) -> None:
        """The backward passes of an in-line batch began at ``wall0`` / process time ``cpu0``: from
        the cores they kept busy, whether a second thread would find one idle. Measured on the second
        batch (the first pays one-time costs: allocations, kernel selection)."""
        self._batches += 1
        if self.spare is None and self._thread is None and self._batches == 2:
            wall = time.perf_counter() - wall0
            busy = (time.process_time() - cpu0) / wall if wall > 0 else float(_cores())
            self.spare = _cores() - busy

    def start(self, x: Tensor) -> None:
        """Begin the forward for ``x`` on a second thread when :func:`overlap_allowed`, the second
        batch's backward passes left ``_OVERLAP_SPARE_CORES`` idle, and the last batch's outputs were
        at most ``_OVERLAP_BYTES`` (the first two batches run in line, measuring both); :meth:`finish`
        hands over the outputs either way."""
        if (not self.overlap or self.last_bytes is None or self.last_bytes > _OVERLAP_BYTES
                or self.spare is None or self.spare < _OVERLAP_SPARE_CORES):
            return

        def work() -> None:
            try:
                self._result = self.run(x)
            except BaseException as err:  # re-raised in the caller's thread by finish()
                self._result = err

        self._thread = threading.Thread(target=work, name="ftdoctor-reference", daemon=True)
        self._thread.start()

    def finish(self, x: Tensor) -> dict[str, Tensor]:
        """The reference's affine outputs for ``x``: from the thread :meth:`start` began, or run now."""
        if self._thread is None:
            return self.run(x)
        self._join()
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._join()   # never leave the thread running past the pass (an error in a backward pass)
        self._result = None
        for h in self._handles:
            h.remove()
        for m, training in self._modes.items():
            m.train(training)


@contextlib.contextmanager
def _reference_capture(reference: nn.Module | None, pairs: Sequence[tuple[AffineLayer, AffineLayer]],
                       overlap: bool = False) -> Iterator[_RefCapture | None]:
    if reference is None or not pairs:
        yield None
        return
    cap = _RefCapture(reference, pairs, overlap)
    try:
        yield cap
    finally:
        cap.close()
