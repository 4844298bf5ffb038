"""The reference model's forward for R² (L2-SP Fig. 4): its affine outputs, paired with the model's, in line
after the backward passes or on a second thread during them (:func:`overlap_allowed`)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor.model import AffineLayer, restore_modes, training_modes

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


class RefCapture:
    def __init__(self, reference: nn.Module, pairs: Sequence[tuple[AffineLayer, AffineLayer]],
                 overlap: bool = False) -> None:
        self.reference = reference
        self.pairs = pairs
        self.outputs: dict[str, Tensor] = {}
        self.overlap = overlap
        # the probe that reduces a (model output, reference output) pair in the hook (take_pair),
        # and the model's outputs of the batch for it
        self.taker: Any = None
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
        self._modes = training_modes(reference)
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
                forward.logits(self.reference, x)
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
        restore_modes(self._modes)


@contextlib.contextmanager
def reference_capture(reference: nn.Module | None, pairs: Sequence[tuple[AffineLayer, AffineLayer]],
                       overlap: bool = False) -> Iterator[RefCapture | None]:
    if reference is None or not pairs:
        yield None
        return
    cap = RefCapture(reference, pairs, overlap)
    try:
        yield cap
    finally:
        cap.close()
