"""The user's training loop as ftdoctor sees it: its forwards, its logits, the scale of its loss, its gradients.

One :class:`Tap` per model (:meth:`Tap.of`) serves every listener — the live monitor and the L2-SP
callback — so the model carries one set of hooks however many are attached, and they run in a fixed
order. Hooks are installed only while a listener needs them: a monitor between its measuring steps
costs nothing.

**The loss scale.** The loop's loss is whatever the framework formed: the mean cross-entropy of a
micro-batch, divided by the accumulation steps, by ``num_items_in_batch``, multiplied by a gradient
scaler's factor. For the cross-entropy ``ℓ_n = CE(z_n, y_n)`` of example n, ``∂ℓ_n/∂z_n = softmax(z_n) −
onehot(y_n) = e_n`` (ENTAME eq. 7); the loop's gradient at the logits is then ``g_n = s·e_n`` for one
scale ``s`` — the least-squares fit ``s = Σ⟨g_n, e_n⟩ / Σ‖e_n‖²`` finds it from the gradient the
loop's own backward delivers, and its residual says whether the loss was the cross-entropy at all
(label smoothing or class weights are not: :attr:`Step.residual`). Dividing by ``s`` turns the loop's
gradients into those of ``Σ_n ℓ_n``, which is what the probes sum.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from ftdoctor import forward
from ftdoctor.model import AffineLayer, layer_order, measured_layers

#: a loss whose gradient at the logits leaves more than this of its energy unexplained by s·(ŷ − y) is
#: not the cross-entropy of the logits (float32; bfloat16/float16 logits round at ~4e-3, hence their bound)
CE_RESIDUAL = {torch.float32: 1e-4, torch.float64: 1e-8}
CE_RESIDUAL_LOW_PRECISION = 3e-2


@dataclass
class Step:
    """One training forward of the loop (a micro-batch) as the tap saw it."""

    inputs: Any                         # the model's input (a tensor or a mapping), detached
    labels: Tensor | None
    logits: Tensor | None = None        # detached, float32 at least
    scale: float | None = None          # s: the loop's gradient at the logits is s·(ŷ − y) (module doc)
    residual: float | None = None       # ‖g − s·e‖² / ‖g‖²: 0 for a cross-entropy loss

    @property
    def size(self) -> int:
        return int(self.labels.shape[0]) if self.labels is not None else forward.batch_size(self.inputs)


class Listener(Protocol):
    def forward_begin(self, step: Step) -> None: ...
    def logits_seen(self, step: Step) -> None: ...
    def scale_found(self, step: Step) -> None: ...


GradAdder = Callable[[str, Tensor, Step | None], Tensor | None]
GradWatcher = Callable[[str, Tensor, Tensor, Step | None], None]

_TAPS: "weakref.WeakKeyDictionary[nn.Module, Tap]" = weakref.WeakKeyDictionary()


def _inputs(args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The model's input: its first positional argument, or its batched keyword tensors (token ids, masks) —
    not the labels, not a scalar such as Trainer's ``num_items_in_batch``."""
    if args:
        return args[0]
    batched = {k: v for k, v in kwargs.items() if isinstance(v, Tensor) and v.dim() > 0 and k != "labels"}
    sizes = [v.shape[0] for v in batched.values()]
    size = max(set(sizes), key=sizes.count) if sizes else None
    return {k: v for k, v in batched.items() if v.shape[0] == size}


def _detached(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.detach()
    if isinstance(inputs, Mapping):
        return {k: v.detach() for k, v in inputs.items() if isinstance(v, Tensor)}
    return inputs


def fit_scale(g: Tensor, logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(s, residual) of the loop's gradient ``g`` at ``logits`` against the cross-entropy's ŷ − y."""
    z = logits.detach().to(torch.float64)
    e = torch.softmax(z, dim=1)
    e[torch.arange(len(labels), device=e.device), labels.to(e.device)] -= 1.0
    g64 = g.detach().to(torch.float64).reshape(e.shape)
    ee = float((e * e).sum())
    gg = float((g64 * g64).sum())
    if ee <= 0.0:
        return 0.0, 0.0 if gg == 0.0 else 1.0
    s = float((g64 * e).sum()) / ee
    resid = float(((g64 - s * e) ** 2).sum()) / gg if gg > 0 else 0.0
    return s, resid


class Tap:
    """The hooks one model carries for ftdoctor's listeners (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.listeners: list[Listener] = []
        self.watchers: list[GradWatcher] = []    # see each parameter's gradient as the loop's backward forms it
        self.adders: list[GradAdder] = []        # add to it (L2-SP's penalty gradient), after the watchers
        self.labels: Tensor | None = None        # labels of the next training forwards (set_labels)
        self.current: Step | None = None         # the micro-batch whose backward is running or next
        self.quiet = 0                            # > 0: ftdoctor's own forwards (layer discovery), unseen
        self._owner = threading.get_ident()
        self._model_handles: list = []
        self._param_handles: list = []
        self.head: nn.Module | None = None       # the head, once a listener found it (set_head)
        self._head_handle = None
        self._head_out: Tensor | None = None
        self._layout: tuple[list[AffineLayer], list[AffineLayer]] | None = None

    def layout(self, inputs: Any) -> tuple[list[AffineLayer], list[AffineLayer]]:
        """(affine layers in forward order, the layers the norm-aware probes measure), found once from one
        example of ``inputs`` (a forward of ftdoctor's own, in eval mode without gradients, unseen by the
        listeners); :meth:`forget_layout` after the model's layers change (a head replaced)."""
        if self._layout is None:
            example = forward.head(inputs, 1)
            self.quiet += 1
            try:
                with torch.no_grad():
                    layers, _ = layer_order(self.model, example)
                    measured = measured_layers(self.model, layers, example)
            finally:
                self.quiet -= 1
            self._layout = (layers, measured)
        return self._layout

    def forget_layout(self) -> None:
        self._layout = None

    def copy_model(self) -> nn.Module:
        """A deep copy of the model as it is now, in eval mode without gradients, carrying none of the
        tap's hooks (the model's own hooks, a feature norm's, are copied with it)."""
        import copy
        handles, self._model_handles = self._model_handles, []
        for h in handles:
            h.remove()
        try:
            ref = copy.deepcopy(self.model)
        finally:
            self._install()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref.eval()

    @classmethod
    def of(cls, model: nn.Module) -> "Tap":
        tap = _TAPS.get(model)
        if tap is None:
            tap = _TAPS[model] = cls(model)
        return tap

    # -- who listens ----------------------------------------------------------------------------
    def add(self, listener: Listener | None = None, *, watcher: GradWatcher | None = None,
            adder: GradAdder | None = None) -> None:
        if listener is not None and listener not in self.listeners:
            self.listeners.append(listener)
        if watcher is not None and watcher not in self.watchers:
            self.watchers.append(watcher)
        if adder is not None and adder not in self.adders:
            self.adders.append(adder)
        self._install()

    def remove(self, listener: Listener | None = None, *, watcher: GradWatcher | None = None,
               adder: GradAdder | None = None) -> None:
        for items, item in ((self.listeners, listener), (self.watchers, watcher), (self.adders, adder)):
            if item is not None and item in items:
                items.remove(item)
        self._install()

    def _install(self) -> None:
        want_model = bool(self.listeners or self.adders)
        if want_model and not self._model_handles:
            self._model_handles = [
                self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.model.register_forward_hook(self._post)]
        elif not want_model:
            for h in self._model_handles:
                h.remove()
            self._model_handles = []
        if want_model and self.head is not None and self._head_handle is None:
            self._head_handle = self.head.register_forward_hook(self._head_seen)
        elif not want_model and self._head_handle is not None:
            self._head_handle.remove()
            self._head_handle = None
        want_params = bool(self.watchers or self.adders)
        if want_params and not self._param_handles:
            self._param_handles = [p.register_hook(self._param_hook(n, p))
                                   for n, p in self.model.named_parameters() if p.requires_grad]
        elif not want_params:
            for h in self._param_handles:
                h.remove()
            self._param_handles = []

    def set_head(self, head: nn.Module) -> None:
        """The model's head: its output is where the loss's gradient is read, the logits the loss was formed
        from — a wrapper may hand back a converted copy as the model's output (Accelerate's mixed precision
        returns float32 copies of bfloat16 logits, and the model's own loss never reaches them)."""
        if head is not self.head:
            self.head = head
            if self._head_handle is not None:
                self._head_handle.remove()
                self._head_handle = None
            self._install()

    def _head_seen(self, module: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, Tensor) and self._training(module):
            self._head_out = out

    def refresh(self) -> None:
        """Hook the model's parameters again (a module of it was replaced) and find its layers anew."""
        for h in self._param_handles:
            h.remove()
        self._param_handles = []
        self._layout = None
        self._install()

    def set_labels(self, labels: Tensor | None) -> None:
        """The labels of the loop's next training forward(s), for a forward that is not given them."""
        self.labels = labels.detach() if isinstance(labels, Tensor) else None

    # -- the hooks ------------------------------------------------------------------------------
    def _training(self, module: nn.Module) -> bool:
        return (module.training and torch.is_grad_enabled() and not self.quiet
                and threading.get_ident() == self._owner)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._training(module):
            return
        labels = kwargs.get("labels")
        labels = labels if isinstance(labels, Tensor) else self.labels
        step = Step(_detached(_inputs(args, kwargs)), labels.detach() if isinstance(labels, Tensor) else None)
        self.current = step
        self._head_out = None
        for listener in list(self.listeners):
            listener.forward_begin(step)

    def _post(self, module: nn.Module, args: tuple, out: Any) -> None:
        step = self.current
        if step is None or not self._training(module):
            return
        logits = forward.as_logits(out)
        head = self._head_out
        self._head_out = None
        if (isinstance(head, Tensor) and isinstance(logits, Tensor) and head.shape == logits.shape
                and head.requires_grad):
            logits = head          # what the loss was formed from, not a wrapper's converted copy
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            return
        step.logits = logits.detach()
        for listener in list(self.listeners):
            listener.logits_seen(step)
        if logits.requires_grad and step.labels is not None and step.labels.shape[0] == logits.shape[0]:
            def fit(g: Tensor) -> None:
                step.scale, step.residual = fit_scale(g, logits, step.labels)
                for listener in list(self.listeners):
                    listener.scale_found(step)
            logits.register_hook(fit)

    def _param_hook(self, name: str, p: Tensor) -> Callable[[Tensor], Tensor | None]:
        def hook(g: Tensor) -> Tensor | None:
            step = self.current
            for watch in list(self.watchers):
                watch(name, p, g, step)
            extra = None
            for add in list(self.adders):
                a = add(name, p, step)
                if a is not None:
                    extra = a if extra is None else extra + a
            return None if extra is None else g + extra.to(g.dtype)
        return hook

    def close(self) -> None:
        self.listeners.clear()
        self.watchers.clear()
        self.adders.clear()
        self._install()
        _TAPS.pop(self.model, None)
