"""The one place a model meets a batch: (model, inputs) -> logits.

Everything that runs a model — the probe pass, the fixes' measurements, the
layer order, fine-tuning, accuracy — calls :func:`logits`, so a model is
usable by all of ftdoctor as soon as this seam can feed it:

* **inputs** are a tensor (images: ``model(x)``) or a mapping of tensors
  (token ids and an attention mask: ``model(**inputs)``), batched along dim 0;
* **outputs** may be a tensor, a tuple or list whose first element holds the
  logits, a mapping with ``"logits"``, or an object with a ``.logits``
  attribute (Hugging Face's ``ModelOutput``).

The helpers batch, move, copy and slice inputs of either kind.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

Inputs = Union[Tensor, Mapping[str, Tensor]]


def logits(model: nn.Module, inputs: Inputs) -> Tensor:
    """Run ``model`` on ``inputs`` and return its logits (see the module doc for what either may be)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return as_logits(out)


def as_logits(out: Any) -> Any:
    """The logits inside a model's output: the tensor itself, ``out.logits``, ``out["logits"]`` or ``out[0]``.

    Anything else is returned as it is, for the caller to judge (``engine.check_logits`` names the shape).
    """
    if isinstance(out, Tensor):
        return out
    found = getattr(out, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out


def to_device(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def clone(inputs: Inputs) -> Inputs:
    """A copy the model's forward cannot change in place."""
    if isinstance(inputs, Mapping):
        return {k: v.clone() for k, v in inputs.items()}
    return inputs.clone()


def stack(examples: Sequence[Inputs]) -> Inputs:
    """Single examples batched along a new dim 0 (key by key for mappings)."""
    first = examples[0]
    if isinstance(first, Mapping):
        return {k: torch.stack([e[k] for e in examples]) for k in first}
    return torch.stack(list(examples))


def cat(batches: Sequence[Inputs]) -> Inputs:
    """Batches joined along dim 0 (key by key for mappings)."""
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    return torch.cat(list(batches))


def take(inputs: Inputs, index: Tensor | slice) -> Inputs:
    """The examples ``index`` (indices or a slice) of a batch."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def empty_batch(example: Inputs) -> Inputs:
    """A batch of no examples shaped like ``example`` (an empty shard under ``torchrun``)."""
    if isinstance(example, Mapping):
        return {k: torch.empty((0, *v.shape), dtype=v.dtype) for k, v in example.items()}
    return torch.empty((0, *example.shape), dtype=example.dtype)


def head(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` examples."""
    if isinstance(inputs, Mapping):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def batch_size(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0]) if inputs else 0
    return int(inputs.shape[0])


def input_leaf(inputs: Inputs) -> Inputs | None:
    """``inputs`` as a leaf requiring grad, so a backward pass can stop at it; None when they cannot carry a
    gradient (integer token ids)."""
    if isinstance(inputs, Mapping) or not inputs.is_floating_point():
        return None
    return inputs.detach().requires_grad_(True)
