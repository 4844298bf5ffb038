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
  over examples (:mod:`ftdoctor.engine.persample`). A backward that only feeds
  them (the random loss's; the cross-entropy's when no probe reads its batch
  gradient) asks autograd only for the gradients at the outputs of the *root*
  layers — those fed by the model's input through no other affine layer — so
  it forms no weight gradient and no gradient below them (resnet18's first
  convolution would cost 10 ms a batch for a 3-channel input gradient nobody
  reads). A layer reading token ids (an embedding) is a root too, so a text
  model's backward forms no weight gradient either. Every layer whose output
  depends on the input lies on a path from the loss to a root; a layer whose
  output does not (e.g. a Linear on learned queries) is listed in ``skipped``.
  Without an input tensor to start from (token ids, a mapping of inputs) a
  layer may lie above no root (fed through a functional embedding): a second
  backward to its output reaches it.
* ``rand_grads`` / ``ce_grads`` — batch gradients of the affine weights.

The model is left as it was: hooks removed, the train/eval flags and
``requires_grad`` flags restored, no ``.grad`` touched (``torch.autograd.grad``
does not accumulate), parameters and buffers untouched (eval mode does not
update BatchNorm statistics).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor import progress as _progress
from ftdoctor.engine.batch import Batch
from ftdoctor.engine.capture import Capture
from ftdoctor.engine.reference import overlap_allowed, reference_capture
from ftdoctor.errors import FtdoctorError
from ftdoctor.model import AffineLayer, restore_modes, training_modes
from ftdoctor.rng import example_normals

if TYPE_CHECKING:
    from ftdoctor.probes.base import Probe


@dataclass(frozen=True)
class PassSettings:
    """How the shared backward passes are formed."""

    seed: int = 0
    change_rate_mode: str = "exact"    # exact | batch
    change_rate_loss: str = "random"   # random | ce
    #: the model's forward (and so its backward) under torch.autocast in this dtype (bfloat16, float16); the
    #: losses are formed from float32 logits and every accumulator stays float64. None: the model's own dtype
    autocast: torch.dtype | None = None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def preserved(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``params`` for the pass; everything restored after."""
    modes = training_modes(model)
    flags = [(p, p.requires_grad) for p in params]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        restore_modes(modes)
        for p, flag in flags:
            p.requires_grad_(flag)


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
    ce_weight_grads = "ce_grads" in needs
    # a backward that only feeds the per-example squares stops at the root layers' outputs
    roots = (need_rand and not rand_weight_grads) or (need_ce and not ce_weight_grads)
    need_graph = need_rand or need_ce
    params = _affine_params(layers)
    ref_pairs = list(reference_pairs)
    seen = 0
    with preserved(model, params if need_graph else []), \
            Capture(layers, head, grad_sq=want_grad_sq, outputs="outputs" in needs,
                     head_input="head_input" in needs) as cap, \
            reference_capture(reference, ref_pairs, reference is not None and need_graph and all_reduce is None
                               and overlap_allowed(model, reference, device)) as ref_cap, \
            _progress.task(description, total, "examples") as bar:
        # one probe takes the per-example squares: it may have them added into its running sums
        takers = [p for p in probes if "grad_sq" in p.needs]
        if len(takers) == 1:
            cap.grad_sq_sink = takers[0].grad_sq_sink
        # the one probe comparing outputs may reduce pairs during the reference's forward
        pairers = [p for p in probes if "outputs" in p.needs]
        if ref_cap is not None and len(pairers) == 1:
            ref_cap.taker = pairers[0]
        # the layers' outputs need no copy where nothing changes them in place: the input's copy for the
        # reference (x_ref) lets the forward run again when something does
        cap.keep_without_copy = ref_cap is not None
        for x, y, idx, global_size in batches:
            x = forward.to_device(x, device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            cap.clear()
            cap.batch_size = int(y.shape[0])
            batch = Batch(x=x, y=y, index=idx, logits=torch.empty(0, num_classes, device=device),
                          global_size=int(global_size))
            rand_g: Sequence[Tensor | None] | None = None
            ce_g: Sequence[Tensor | None] | None = None
            if batch.size:
                # the reference sees the batch as loaded, even if the model's forward changes its input in place
                x_ref = forward.clone(x) if ref_cap is not None else None
                leaf = forward.input_leaf(x) if roots else None
                x_in = leaf if leaf is not None else x
                cap.input_leaf, cap.find_roots = leaf, roots
                with torch.set_grad_enabled(need_graph), autocast(device, settings.autocast), \
                        torch.profiler.record_function("ftdoctor.forward"):
                    logits = forward.logits(model, x_in)
                if x_ref is not None and not cap.outputs_intact():
                    _outputs_again(model, cap, x_ref, device, settings.autocast)
                if settings.autocast is not None:
                    logits = logits.float()          # the losses in float32, as mixed-precision training forms them
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
                        with torch.profiler.record_function("ftdoctor.backward_random"):
                            rand_g = torch.autograd.grad(loss_r, params, retain_graph=need_ce, allow_unused=True)
                    else:
                        cap.phase, cap.grad_scale = "grad_sq", 1.0
                        with torch.profiler.record_function("ftdoctor.backward_random"):
                            _to_roots(loss_r, cap, leaf, params, retain=need_ce)
                        batch.grad_sq, cap.grad_sq = cap.grad_sq, {}
                if need_ce:
                    # the global batch's mean CE: local sum / global size (DDP's averaging)
                    loss_ce = F.cross_entropy(logits, y, reduction="sum") / global_size
                    ce_sq = want_grad_sq and loss_kind == "ce"
                    # per-example terms CE_n = global_size · (this loss's share): scale the output gradient
                    cap.phase, cap.grad_scale = ("grad_sq", float(global_size)) if ce_sq else (None, 1.0)
                    with torch.profiler.record_function("ftdoctor.backward_ce"):
                        if ce_weight_grads:
                            ce_g = torch.autograd.grad(loss_ce, params, allow_unused=True)
                        else:
                            _to_roots(loss_ce, cap, leaf, params, retain=False)
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
                    with torch.profiler.record_function("ftdoctor.reference_forward"):
                        batch.ref_outputs = ref_cap.finish(x_ref)
            if rand_weight_grads:
                batch.rand_grads = _grads_by_layer(layers, _reduce_grads(params, rand_g, all_reduce))
            if ce_weight_grads:
                batch.ce_grads = _grads_by_layer(layers, _reduce_grads(params, ce_g, all_reduce))
            for probe in probes:
                with torch.profiler.record_function(f"ftdoctor.update.{type(probe).__name__}"):
                    probe.update(batch)
            seen += batch.size
            bar.advance(int(global_size))
            del batch
    return seen


def _outputs_again(model: nn.Module, cap: Capture, x: Tensor, device: torch.device | str,
                   dtype: torch.dtype | None) -> None:
    """The forward again on a copy of the batch as loaded, every layer's output copied: an output kept
    without a copy was changed in place by a later op of the first forward (:meth:`Capture.outputs_intact`)."""
    cap.recapturing = True
    try:
        with torch.no_grad(), autocast(device, dtype):
            forward.logits(model, forward.clone(x))
    finally:
        cap.recapturing = False


def _to_roots(loss: Tensor, cap: Capture, leaf: Tensor | None, params: Sequence[Tensor], retain: bool) -> None:
    """Backward ``loss`` only as far as the root layers' outputs: autograd forms no weight gradient, and the
    tensor hooks see every layer's output gradient on the way (no root at all: every weight is a target
    instead). Without an input leaf a layer may lie above no root: a second backward reaches it."""
    targets = cap.root_edges or ([leaf] if leaf is not None else params)
    again = leaf is None and bool(cap.root_edges)
    torch.autograd.grad(loss, targets, retain_graph=retain or again, allow_unused=True)
    late = cap.late() if again else []
    if late:
        torch.autograd.grad(loss, late, retain_graph=retain, allow_unused=True)


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
