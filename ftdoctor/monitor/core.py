"""The live monitor: ``probe``'s diagnoses measured inside the user's own training loop.

At a measuring step (:class:`~ftdoctor.monitor.schedule.Schedule`) the monitor takes the batches the loop
already has and reuses the loop's forward and backward (through the model's :class:`~ftdoctor.monitor.tap.Tap`):

* **noise** (ENTAME Table 1) from the loop's logits and the head's input;
* **change rates** (Krähenbühl et al. §3) of the cross-entropy from per-example squares formed by hooks
  during the loop's own backward (:class:`~ftdoctor.engine.capture.Capture`, as ``probe
  --change-rate-loss ce``), divided by the loop's loss scale squared;
* **gradient norms** (RIFLE Fig. 2) from the gradients the loop's backward forms, each micro-batch's
  divided by its loss scale (before clipping, before a gradient scaler's unscale, before DDP's average);
* **R²** (L2-SP Fig. 4) of the model against the reference on ``r2_examples`` examples held from the
  first measuring step (its first ones), both in eval mode as ``probe`` runs them: every measuring step
  compares the features on the same examples, so the series follows the model rather than the batches,
  and the reference's outputs on them are formed once (16 by default: R² pools every channel over
  examples and positions, so a few examples estimate it well, and the model's forward of them costs about
  a tenth of a step at a batch of 64; ``r2_examples=None``: every example of that step), and **drift**
  (L2-SP eq. 3) against the reference's weights — the pretrained state, kept once
  (``reference="initial"``: a copy of the model at the loop's first training forward).

The random-loss change rates (``probe``'s default loss) need a backward of their own: opt in with
``random_change_rates=True`` (one more forward and backward of the step's batches, in eval mode).

The figures are those of ``ftdoctor probe`` on the same model state and the same examples (the union of
the step's micro-batches, as one batch): the same probe classes do the sums, the same ``judge()`` rules
the verdicts. One difference is by design: ``probe`` runs the model in eval mode, the monitor reads the
loop's training forward (dropout and batch statistics as the loop had them) for everything but R², which
compares features in eval mode (a dropout mask is not a change of the features); R² is ``probe``'s on the
examples it holds (the first ``r2_examples`` of the first measuring step, of each process under DDP).

A measurement that fails never stops the run: it becomes one warning and the run goes on.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor.distributed import is_main_process, loop_is_distributed, sum_over_ranks
from ftdoctor.engine.batch import Batch
from ftdoctor.engine.capture import Capture
from ftdoctor.engine.reference import RefCapture
from ftdoctor.engine.sums import remembered_norms, sum_of_squares, tensor_stamp
from ftdoctor.model import find_head, is_scripted
from ftdoctor.monitor.schedule import Schedule
from ftdoctor.monitor.tap import CE_RESIDUAL, CE_RESIDUAL_LOW_PRECISION, Step, Tap
from ftdoctor.probes import PROBES, Finding, Probe, ProbeContext
from ftdoctor.probes.verdicts import render
from ftdoctor.thresholds import Thresholds

log = logging.getLogger("ftdoctor.monitor")

#: the probes a monitor runs by default (drift and r2 only with a reference)
DEFAULT_PROBES = ("noise", "change_rate", "grad_norm", "r2", "drift")

#: (probe, threshold key) → the scalar's name in the user's tracker
SCALARS = {"max_noise_fraction": "ftdoctor/noise_fraction",
           "max_excess_noise_fraction": "ftdoctor/excess_noise_fraction",
           "max_change_rate_spread": "ftdoctor/change_rate_spread",
           "max_change_rate_cv": "ftdoctor/change_rate_cv",
           "min_depth_ratio": "ftdoctor/depth_ratio",
           "min_r2_median": "ftdoctor/r2_median",
           "max_drift_rel": "ftdoctor/drift"}

#: what a warning adds for the live run, beyond the command ``probe`` would print
LIVE_ACTIONS = {"noise": "or start the run with the ENTAME head (ftdoctor.monitor: entame=True)",
                "grad_norm": "or re-initialise the head periodically (ftdoctor.monitor: rifle_period=...)",
                "drift": "or add the L2-SP penalty (ftdoctor.monitor: l2sp_alpha=...)"}


@dataclass
class Measurement:
    """One measuring step: the scalars as logged, the probes' JSON blocks, the findings."""

    step: int
    examples: int
    scalars: dict[str, float]
    figures: dict[str, dict[str, Any]]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    loss: float | None = None            # the mean cross-entropy of the step's examples
    accuracy: float | None = None        # the fraction the logits got right
    lr: float | None = None              # the head's learning rate, when the monitor knows the optimizer
    feature_var: float | None = None     # variance across the step's examples of the head's input (ENTAME Fig. 1)

    def layer_series(self, probe: str, key: str) -> dict[str, float | None]:
        """A per-layer figure by layer name (``layer_series("grad_norm", "grad_norm")``)."""
        return {row["name"]: row.get(key) for row in self.figures.get(probe, {}).get("layers", [])}


@dataclass
class _Grad:
    """One measured parameter's gradient over the step: ‖g/s‖² of its only micro-batch, or Σ_i g_i/s_i kept."""

    step: Step                  # the micro-batch whose gradient came last
    scale: float                # the first micro-batch's loss scale
    sq: float | None            # ‖g₁/s₁‖² while only one micro-batch has reached the parameter
    vector: Tensor | None       # Σ_i g_i/s_i once kept


@dataclass
class _MicroBatch:
    step: Step
    capture: Capture
    grad_sq: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    head_input: Tensor | None = None


def _all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the loop's processes (its own process group, not ``ftdoctor.distributed.setup``'s)."""
    return sum_over_ranks(t) if loop_is_distributed() else t


#: the reference's outputs on R²'s held examples are kept between measuring steps up to this size (bytes)
R2_KEEP_BYTES = 128 * 2**20


def _versions(module: nn.Module | None) -> tuple[tuple[int, int], ...]:
    """The :func:`~ftdoctor.engine.sums.tensor_stamp` of each of a module's tensors."""
    if module is None:
        return ()
    return tuple(tensor_stamp(t) for t in (*module.parameters(), *module.buffers()))


def _frozen(module: nn.Module | None) -> bool:
    """No parameter requires a gradient: no optimizer step reaches it (a fused one changes a tensor
    without moving its version counter, so only a frozen module's outputs may be kept)."""
    return module is not None and not any(p.requires_grad for p in module.parameters())


def _import_what_a_measurement_needs() -> None:
    """Import now, with the run's setup, the modules the first measuring step would otherwise import on first
    use — the layer pairing, the rescale planner the change rates' suggestion consults, the suggestions'
    renderer — so that no training step stalls on them (BERT-mini: 0.05–0.2 s, more than a step, without
    cached bytecode)."""
    import ftdoctor.checkpoint.folder  # noqa: F401
    import ftdoctor.diagnose  # noqa: F401
    import ftdoctor.fixes.scale_graph  # noqa: F401


class Monitor:
    """``ftdoctor probe``'s diagnoses at the measuring steps of the user's own loop (module doc).

    In a plain loop::

        monitor = Monitor(model, schedule=Schedule(every=50, first=3))
        for step, (x, y) in enumerate(loader):
            monitor.begin(step, labels=y)          # arms the hooks only at a measuring step
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            m = monitor.end()                      # before optimizer.step(): a Measurement, or None
            opt.step(); opt.zero_grad()

    With gradient accumulation call :meth:`set_labels` before each micro-batch's forward (a forward given
    ``labels=`` as a keyword, as Hugging Face models are, needs nothing). ``reference``: ``"initial"`` (a
    copy of the model as it is at the loop's first training forward: the pretrained state with its head, as
    the run starts from it, after any method such as the ENTAME head was applied), a module of the
    same architecture, or None (no R², no drift). ``thresholds``: the bounds the findings use (``check``'s).
    """

    def __init__(self, model: nn.Module, *, schedule: Schedule | int | Sequence[int] | None = None,
                 probes: Sequence[str] | None = None, reference: nn.Module | str | None = "initial",
                 thresholds: Thresholds | None = None, head: str | None = None, r2_layers: Sequence[str] | None = None,
                 random_change_rates: bool = False, change_rate_cv: bool = False, r2_examples: int | None = 16,
                 seed: int = 0, warn: bool = True,
                 optimizer: torch.optim.Optimizer | None = None,
                 on_measurement: Callable[[Measurement], None] | None = None) -> None:
        if is_scripted(model):
            raise ValueError("a TorchScript model runs no Python hooks: the monitor cannot see inside it")
        self.model = model
        self.schedule = Schedule.of(schedule)
        names = tuple(probes) if probes is not None else DEFAULT_PROBES
        unknown = [n for n in names if n not in PROBES]
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)}: choose from {', '.join(PROBES.names())}")
        if isinstance(reference, str) and reference != "initial":
            raise ValueError(f"reference must be 'initial', a module or None, not {reference!r}")
        self._want_initial = reference == "initial"
        self.reference: nn.Module | None = None if self._want_initial else reference
        self.names = tuple(n for n in names if reference is not None or not PROBES[n].needs_reference)
        self.thresholds = thresholds or Thresholds()
        self.head_name = head
        self.r2_layers = tuple(r2_layers) if r2_layers else None
        self.random_change_rates = random_change_rates
        self.change_rate_cv = change_rate_cv
        if r2_examples is not None and r2_examples < 1:
            raise ValueError(f"r2_examples must be at least 1 (or None: every example), not {r2_examples}")
        self.r2_examples = r2_examples
        self.seed = seed
        self.warn = warn
        self.optimizer = optimizer
        self.on_measurement = on_measurement
        self.history: list[Measurement] = []
        self.warned: dict[str, int] = {}          # finding text's key → the step it was first warned at
        self.ctx: ProbeContext | None = None
        self._ref_cap: RefCapture | None = None
        self._norms: dict = {}       # the weights' norms, reused while a tensor is unchanged (the reference's)
        self._r2_held: list[tuple[Any, Tensor]] = []        # R²'s examples, taken at its first step
        self._r2_ref: tuple[tuple, list[dict[str, Tensor]]] | None = None   # (its _versions, the reference's outputs on them)
        self._tap = Tap.of(model)
        self._armed_step: int | None = None
        self._mbs: list[_MicroBatch] = []
        self._grads: dict[str, _Grad] = {}        # each measured parameter's ∇ / s over the step
        self._grad_names: dict[str, tuple[str, int]] = {}   # parameter name → (layer, 0 weight / 1 bias)
        self._failed: str | None = None
        self._closed = False
        if self._want_initial:
            self._tap.add(self)        # to copy the model at its first training forward
        _import_what_a_measurement_needs()

    # -- the loop's side -----------------------------------------------------------------------
    def measures(self, step: int) -> bool:
        return step in self.schedule

    def begin(self, step: int, labels: Tensor | None = None) -> bool:
        """Start optimizer step ``step`` (0-based): True when it is measured (hooks armed until :meth:`end`)."""
        if self._armed_step is not None:
            self._disarm()
        if self._closed or step not in self.schedule:
            return False
        self._armed_step, self._mbs, self._grads, self._failed = step, [], {}, None
        self._tap.set_labels(labels)
        self._tap.add(self)
        if self.ctx is not None:
            self._tap.add(watcher=self._watch_grad)
        return True

    def set_labels(self, labels: Tensor | None) -> None:
        """The labels of the next micro-batch (when its forward is not given ``labels=``)."""
        self._tap.set_labels(labels)

    def end(self) -> Measurement | None:
        """After the step's backward passes, before the optimizer step: the measurement, or None (not a
        measuring step, or it failed: then one warning)."""
        if self._armed_step is None:
            return None
        step = self._armed_step
        self._harvest()
        mbs, grads, failed = self._mbs, self._grads, self._failed
        self._mbs, self._grads = [], {}
        self._disarm()            # the model carries no hook of ours while the figures are formed
        try:
            if failed:
                raise _Unmeasurable(failed)
            with remembered_norms(self._norms) as self._norms:
                m = self._measure(step, mbs, grads)
        except _Unmeasurable as why:
            self._warn_once(f"unmeasurable:{why}", f"ftdoctor monitor: step {step} not measured: {why}", step)
            m = None
        except Exception as exc:  # noqa: BLE001 - a failing measurement never stops the user's run
            self._warn_once(f"error:{type(exc).__name__}", f"ftdoctor monitor: step {step} not measured "
                            f"({type(exc).__name__}: {str(exc)[:200]}); the run goes on", step)
            m = None
        if m is not None:
            self.history.append(m)
            self._report(m)
            if self.on_measurement is not None:
                self.on_measurement(m)
        return m

    @contextlib.contextmanager
    def step(self, step: int, labels: Tensor | None = None) -> Iterator[None]:
        """``with monitor.step(i, labels=y): loss.backward()`` — :meth:`begin` and :meth:`end` around it."""
        self.begin(step, labels)
        yield
        self.end()

    @property
    def r2_held(self) -> list[tuple[Any, Tensor]]:
        """R²'s held examples, as ``(inputs, labels)`` chunks (empty until R² is first measured): what a
        resumed run sets back, on the model's device, to keep its R² series on the same examples."""
        return self._r2_held

    @r2_held.setter
    def r2_held(self, held: Sequence[tuple[Any, Tensor]]) -> None:
        self._r2_held, self._r2_ref = list(held), None

    @property
    def last(self) -> Measurement | None:
        return self.history[-1] if self.history else None

    def close(self) -> None:
        self._want_initial = False
        self._disarm()
        self._closed = True
        if self._ref_cap is not None:
            self._ref_cap.close()
            self._ref_cap = None
        self._r2_ref = None

    # -- the tap's side (Listener) -------------------------------------------------------------
    def forward_begin(self, step: Step) -> None:
        if self._want_initial:
            self._want_initial = False
            self.reference = self._tap.copy_model()
            if self._armed_step is None:
                self._tap.remove(self)
        if self._armed_step is None or self._failed:
            return
        try:
            self._harvest()
            if step.labels is None:
                self._failed = ("the labels of a training forward are unknown: pass labels= to begin() or call "
                                "set_labels(y) before the forward (a model given labels= needs neither)")
                return
            if step.labels.dtype.is_floating_point or step.labels.dim() != 1:
                self._failed = "the labels are not class indices (one integer per example)"
                return
            if self.ctx is None:
                self._discover(step)
                self._tap.add(watcher=self._watch_grad)
            cap = Capture(self.ctx.layers if "change_rate" not in self.names else self.ctx.measured_layers,
                          self.ctx.head, grad_sq="change_rate" in self.names,
                          outputs=False, head_input=True)
            cap.batch_size = step.size
            cap.squares = "elements" if self.change_rate_cv else "totals"
            cap.phase, cap.grad_scale = "grad_sq", 1.0    # unscaled: divided by s² at the harvest
            cap.__enter__()
            self._mbs.append(_MicroBatch(step, cap))
        except Exception as exc:  # noqa: BLE001 - see end()
            self._failed = f"{type(exc).__name__}: {str(exc)[:200]}"

    def logits_seen(self, step: Step) -> None:
        return None

    def scale_found(self, step: Step) -> None:
        return None

    def _watch_grad(self, name: str, p: Tensor, g: Tensor, step: Step | None) -> None:
        """A measured parameter's gradient from one micro-batch's backward, before it is accumulated.

        One micro-batch (the common case) costs one read of ``g``: its squared norm over ``s²``, nothing
        kept. From a second micro-batch on, the sum ``Σ_i g_i / s_i`` is kept: the first one's part is what
        ``p.grad`` holds then (it was empty before it, and nothing else added to it). Under DDP, with an
        adder (L2-SP) or a gradient already there, every part is kept from the first on (:class:`_Grad`).
        """
        if self._armed_step is None or name not in self._grad_names or step is None:
            return
        if not step.scale:
            self._failed = self._failed or "the loss's gradient at the logits was not seen (is the loss formed " \
                                           "from the model's logits?)"
            return
        acc = self._grads.get(name)
        if acc is None:
            keep = loop_is_distributed() or bool(self._tap.adders) or p.grad is not None
            self._grads[name] = _Grad(step, step.scale, None if keep else sum_of_squares(g) / step.scale ** 2,
                                      g.detach() / step.scale if keep else None)
            return
        if acc.step is step:        # the same micro-batch reaching the parameter twice (a shared weight)
            self._failed = self._failed or f"{name} received two gradients in one backward"
            return
        if acc.vector is None:
            acc.vector = p.grad.detach() / acc.scale
        acc.vector.add_(g.detach(), alpha=1.0 / step.scale)
        acc.step = step

    # -- measuring ------------------------------------------------------------------------------
    def _discover(self, step: Step) -> None:
        """The layers in forward order and the head, from one example of the first measured batch."""
        layers, measured = self._tap.layout(step.inputs)
        head = find_head(layers, self.head_name)
        self._tap.set_head(head.module)
        num_classes = int(step.logits.shape[1]) if step.logits is not None else int(head.weight.shape[0])
        from ftdoctor.diagnose import reference_pairs
        pairs = tuple(reference_pairs(layers, self.reference, self.r2_layers)) if self.reference is not None else ()
        self.ctx = ProbeContext(model=self.model, layers=tuple(layers), head=head, num_classes=num_classes,
                                measured=tuple(measured), seed=self.seed, reference=self.reference,
                                reference_layers=pairs, change_rate_loss="ce",
                                change_rate_mode="exact" if self.change_rate_cv else "totals")
        if "r2" in self.names and pairs:
            self._ref_cap = RefCapture(self.reference, pairs)
        for layer in measured:
            for i, t in enumerate((layer.weight, layer.bias)):
                if isinstance(t, Tensor):
                    pname = self._param_name(t)
                    if pname is not None:
                        self._grad_names[pname] = (layer.name, i)

    def _param_name(self, t: Tensor) -> str | None:
        for n, p in self.model.named_parameters():
            if p is t:
                return n
        return None

    def _harvest(self) -> None:
        """Move the last micro-batch's capture (its backward has run) into its record; unhook it."""
        if not self._mbs or self._mbs[-1].capture is None:
            return
        mb = self._mbs[-1]
        cap = mb.capture
        s = mb.step.scale
        if s:
            mb.grad_sq = {k: v / (s * s) for k, v in cap.grad_sq.items()}
        mb.outputs = dict(cap.outputs)
        mb.head_input = cap.head_input
        cap.__exit__(None, None, None)
        mb.capture = None

    def _measure(self, step: int, mbs: list[_MicroBatch], grads: dict[str, "_Grad"]) -> Measurement:
        ctx = self.ctx
        mbs = [mb for mb in mbs if mb.step.logits is not None]
        if ctx is None or not mbs:
            raise _Unmeasurable("no training forward of the model ran during the step")
        notes: list[str] = []
        for mb in mbs:
            if mb.step.scale is None:
                raise _Unmeasurable("no backward reached the logits during the step (call end() after "
                                    "loss.backward(), before optimizer.step())")
            if not math.isfinite(mb.step.scale) or mb.step.scale == 0:
                raise _Unmeasurable(f"the loss's gradient at the logits is {mb.step.scale} (a skipped or "
                                    "non-finite step)")
            bound = CE_RESIDUAL.get(mb.step.logits.dtype, CE_RESIDUAL_LOW_PRECISION)
            if mb.step.residual is not None and mb.step.residual > bound:
                note = (f"the loop's loss is not the cross-entropy of the logits (its gradient at the logits "
                        f"departs from s·(ŷ − y) by {mb.step.residual:.2g} of its energy): change rates and "
                        f"gradient norms are those of the loop's own loss, scaled to the cross-entropy's units")
                if note not in notes:
                    notes.append(note)
        probes: list[Probe] = []
        for name in self.names:
            p = PROBES[name](ctx)
            if not p.unavailable():
                probes.append(p)
        local_n = sum(mb.step.size for mb in mbs)
        global_n = int(_all_reduce_sum(torch.tensor(float(local_n), dtype=torch.float64)).item())
        for mb in mbs:
            batch = Batch(x=mb.step.inputs, y=mb.step.labels, index=torch.arange(mb.step.size),
                          logits=mb.step.logits.float() if mb.step.logits.dtype != torch.float64 else mb.step.logits,
                          global_size=global_n, head_input=mb.head_input, grad_sq=mb.grad_sq, outputs=mb.outputs)
            for p in probes:
                if p.name in ("noise", "change_rate"):
                    p.update(batch)
        r2_probe = next((p for p in probes if p.name == "r2"), None)
        if r2_probe is not None and self._ref_cap is not None:
            for batch in self._r2_batches(mbs):
                r2_probe.update(batch)
        grad_probe = next((p for p in probes if p.name == "grad_norm"), None)
        if grad_probe is not None:
            grad_probe.update(self._grad_batch(mbs, grads, global_n))
        if self.random_change_rates:
            probes = [p for p in probes if p.name != "change_rate"]
        for p in probes:
            p.reduce_(_all_reduce_sum)
        results = {p.name: p.compute() for p in probes}
        if self.random_change_rates:
            results["change_rate"] = self._random_change_rates(mbs)
        findings: list[Finding] = []
        for p in probes:
            findings.extend(p.findings(results[p.name], self.thresholds))
            notes.extend(p.notes)
        if self.random_change_rates:
            findings.extend(PROBES["change_rate"](ctx).findings(results["change_rate"], self.thresholds))
        scalars: dict[str, float] = {}
        defaults = Thresholds()
        for name, res in results.items():
            for v in PROBES[name].judge(res.figures, defaults):
                key = SCALARS.get(v.key)
                if key is not None and v.value is not None and math.isfinite(v.value):
                    scalars[key] = float(v.value)
        drift = results.get("drift")
        if drift is not None and drift.figures.get("sp_penalty") is not None:
            scalars["ftdoctor/sp_penalty"] = float(drift.figures["sp_penalty"])
        loss, acc = self._loss_and_accuracy(mbs)
        figures = {name: res.figures.to_json() for name, res in results.items()}
        return Measurement(step=step, examples=global_n, scalars=scalars, figures=figures, findings=findings,
                           notes=notes, loss=loss, accuracy=acc, lr=self._head_lr(),
                           feature_var=self._feature_variance(mbs))

    def _r2_batches(self, mbs: list[_MicroBatch]) -> Iterator[Batch]:
        """The held examples (:meth:`_hold_r2_examples`), chunk by chunk, with the layer outputs of the model
        and of the reference on them, both in eval mode as ``probe`` forms them: the loop's training forward
        carries its dropout masks and batch statistics, which are not a change of the features (one forward
        of the model per measuring step, no gradient; the reference's outputs kept from the first while
        they fit in :data:`R2_KEEP_BYTES`, the reference is frozen and its tensors are unchanged)."""
        if not self._r2_held:
            self._r2_held = self._hold_r2_examples(mbs)
        stamp = _versions(self.reference)
        if self._r2_ref is not None and self._r2_ref[0] != stamp:
            self._r2_ref = None
        refs = self._r2_ref[1] if self._r2_ref is not None else None
        mine = RefCapture(self.model, [(layer, layer) for layer, _ in self.ctx.reference_layers])
        formed: list[dict[str, Tensor]] = []
        try:
            for i, (x, y) in enumerate(self._r2_held):
                with torch.no_grad():
                    outputs = mine.run(x)
                    ref = refs[i] if refs is not None else self._ref_cap.run(x)
                formed.append(ref)
                yield Batch(x=x, y=y, index=torch.arange(len(y)), logits=torch.empty(0), outputs=outputs,
                            ref_outputs=ref)
        finally:
            mine.close()       # the model's own modes back, its hooks removed
        if refs is None and len(formed) == len(self._r2_held) and _frozen(self.reference):
            size = sum(t.numel() * t.element_size() for ref in formed for t in ref.values())
            if size <= R2_KEEP_BYTES:
                self._r2_ref = (stamp, formed)

    def _hold_r2_examples(self, mbs: list[_MicroBatch]) -> list[tuple[Any, Tensor]]:
        """The first ``r2_examples`` examples of the first step R² is measured at (every example with None),
        copied, one chunk per micro-batch: every later measuring step compares the features on the same
        examples, so the R² series follows the model, not the batches (and the reference's outputs on them
        are formed once)."""
        held, left = [], self.r2_examples
        for mb in mbs:
            n = mb.step.size if left is None else min(left, mb.step.size)
            if n <= 0:
                break
            held.append((forward.clone(forward.head(mb.step.inputs, n)), mb.step.labels[:n].detach().clone()))
            if left is not None:
                left -= n
        return held

    def _grad_batch(self, mbs: list[_MicroBatch], grads: dict[str, "_Grad"], global_n: int) -> Batch:
        """A batch carrying ‖∇‖² of the mean cross-entropy over the step's (global) examples per measured
        layer's weight and bias (the kept sums all-reduced across processes first)."""
        ctx = self.ctx
        names = {v: k for k, v in self._grad_names.items()}
        kept = [(k, acc) for k, acc in sorted(grads.items()) if acc.vector is not None]
        if loop_is_distributed():
            total = _all_reduce_sum(torch.cat([acc.vector.reshape(-1) for _, acc in kept])) if kept else None
            offset = 0
            for _, acc in kept:
                n = acc.vector.numel()
                acc.vector = total[offset:offset + n]
                offset += n
        sq: dict[str, tuple[float, float | None]] = {}
        for layer in ctx.measured_layers:
            pair: list[float | None] = [0.0, None]
            for i, t in enumerate((layer.weight, layer.bias)):
                if not isinstance(t, Tensor):
                    continue
                acc = grads.get(names.get((layer.name, i), ""))
                total_sq = 0.0 if acc is None else acc.sq if acc.vector is None else sum_of_squares(acc.vector)
                pair[i] = total_sq / (global_n * global_n)
            sq[layer.name] = (pair[0], pair[1])
        logits = torch.cat([mb.step.logits.float() for mb in mbs])
        return Batch(x=torch.empty(0), y=torch.cat([mb.step.labels for mb in mbs]), index=torch.empty(0),
                     logits=logits, global_size=global_n, ce_grad_sq=sq)

    def _random_change_rates(self, mbs: list[_MicroBatch]) -> Any:
        """The random-loss change rates (``probe``'s default): one more pass over the step's batches (opt-in)."""
        from ftdoctor.engine import PassSettings, run_pass
        ctx = self.ctx
        rand_ctx = ProbeContext(**{**ctx.__dict__, "change_rate_loss": "random"})
        p = PROBES["change_rate"](rand_ctx)
        batches = [(mb.step.inputs, mb.step.labels, torch.arange(mb.step.size) + sum(m.step.size for m in mbs[:i]),
                    mb.step.size) for i, mb in enumerate(mbs)]
        run_pass(self.model, batches, [p], list(ctx.measured_layers), ctx.head, ctx.num_classes,
                 PassSettings(seed=self.seed, change_rate_loss="random"),
                 device=ctx.head.weight.device, description="ftdoctor monitor: random-loss change rates")
        p.reduce_(_all_reduce_sum)
        return p.compute()

    def _loss_and_accuracy(self, mbs: list[_MicroBatch]) -> tuple[float, float]:
        z = torch.cat([mb.step.logits.to(torch.float64) for mb in mbs])
        y = torch.cat([mb.step.labels.to(z.device) for mb in mbs])
        sums = torch.stack([torch.nn.functional.cross_entropy(z, y, reduction="sum"),
                            (z.argmax(1) == y).sum().to(torch.float64), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                                       device=z.device)])
        sums = _all_reduce_sum(sums)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    @staticmethod
    def _feature_variance(mbs: list[_MicroBatch]) -> float | None:
        """Var across the (global) step's examples of the head's input, averaged over its features."""
        feats = [mb.head_input.reshape(mb.head_input.shape[0], -1).to(torch.float64) for mb in mbs
                 if mb.head_input is not None]
        if len(feats) != len(mbs):
            return None
        f = torch.cat(feats)
        sums = _all_reduce_sum(torch.cat([f.sum(0), (f * f).sum(0), torch.tensor([float(len(f))], dtype=torch.float64,
                                                                                   device=f.device)]))
        d = f.shape[1]
        n = float(sums[-1])
        mean = sums[:d] / n
        return float((sums[d:2 * d] / n - mean * mean).clamp_(min=0).mean())

    def _head_lr(self) -> float | None:
        if self.optimizer is None or self.ctx is None:
            return None
        ids = {id(p) for p in self.ctx.head.module.parameters()}
        for g in self.optimizer.param_groups:
            if any(id(p) in ids for p in g["params"]):
                return float(g["lr"])
        return None

    def _disarm(self) -> None:
        for mb in self._mbs:
            if mb.capture is not None:
                mb.capture.__exit__(None, None, None)
                mb.capture = None
        self._mbs, self._grads = [], {}
        self._armed_step = None
        self._tap.remove(None if self._want_initial else self, watcher=self._watch_grad)
        self._tap.set_labels(None)

    # -- telling the user ----------------------------------------------------------------------
    def _report(self, m: Measurement) -> None:
        if not self.warn or not is_main_process():
            return
        for f in m.findings:
            if f.severity not in ("warning", "error"):
                continue
            # one warning per kind of finding: the probe and its words up to the first figure
            key = f.probe if f.probe == "noise" else f"{f.probe}:{re.split(r'[0-9(]', f.message, maxsplit=1)[0]}"
            text = f"ftdoctor step {m.step}: {f.message}"
            action = render(f.suggestion)
            if action:
                text += f"; {action}"
            if f.probe in LIVE_ACTIONS:
                text += f" {LIVE_ACTIONS[f.probe]}"
            self._warn_once(key, text, m.step)

    def _warn_once(self, key: str, text: str, step: int) -> None:
        if key in self.warned:
            return
        self.warned[key] = step
        log.warning(text)


class _Unmeasurable(Exception):
    pass
