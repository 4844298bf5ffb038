"""What the engine measured on one batch, handed to every probe's ``update``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """Everything the engine measured on one batch, shared by all probes.

    Tensors are detached. ``grad_sq`` and the per-layer gradients are filled
    only when a probe asked for them (see :attr:`Probe.needs`).
    """

    x: Tensor
    y: Tensor
    index: Tensor
    logits: Tensor                                   # (B, C)
    global_size: int = 0                             # examples in the global batch (all processes)
    head_input: Tensor | None = None                 # the head's input features
    ce_grads: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)    # ∇ of mean CE
    # or only their squared norms (‖∇W‖², ‖∇b‖² or None), as the live monitor forms them without a copy
    ce_grad_sq: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    rand_grads: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # ∇ of Σ η·logits
    grad_sq: dict[str, Tensor] = field(default_factory=dict)  # Σ_n (∂ℓ_n/∂W)² of this batch
    outputs: dict[str, Tensor] = field(default_factory=dict)      # affine outputs (r2)
    ref_outputs: dict[str, Tensor] = field(default_factory=dict)  # reference affine outputs (r2)

    _logit_range: Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.y.shape[0])

    def logit_range_sum(self) -> Tensor:
        """Σ over the batch's examples of max − min of their logits (float64, on the CPU), computed once
        for every probe that asks (:mod:`ftdoctor.probes.head`); a NaN counts as an infinite range."""
        if self._logit_range is None:
            z = self.logits.detach().to(torch.float64)
            if z.dim() != 2 or z.numel() == 0:
                self._logit_range = torch.zeros((), dtype=torch.float64)
            else:
                span = z.max(dim=1).values - z.min(dim=1).values
                self._logit_range = span.nan_to_num(nan=float("inf")).sum().cpu()
        return self._logit_range
