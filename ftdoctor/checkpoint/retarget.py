"""A checkpoint's other entries after its head changed class count, so it reloads in its own framework.

A state dict wrapped in a training checkpoint (Lightning's ``.ckpt``: ``state_dict``,
``hyper_parameters``, ``optimizer_states``, ``lr_schedulers``, ...; or a plain
``{"model": ..., "optimizer": ..., "num_classes": 10}``) keeps everything but the
weights as it was read. When ``fix --new-head`` (or ``trace --save``) gives the
head another class count, two of those entries would break a reload:

* the class count named in the hyper-parameters: ``LightningModule.load_from_checkpoint``
  builds the module from ``hyper_parameters`` and then fails on the head's
  shape. Every integer equal to the old count under a class-count name
  (:data:`CLASS_COUNT_NAMES`), at the top level or in the hyper-parameter dicts
  (:data:`HPARAM_KEYS`, nested up to three levels), is set to the new count;
* optimizer and scheduler states (:data:`OPTIMIZER_KEYS`) hold moments for the
  old head's parameters: they are dropped (a fine-tune from a fixed checkpoint
  starts its optimizer afresh).

What was changed, and what the user must change otherwise, is said in notes.
"""
from __future__ import annotations

import copy
from typing import Any

CLASS_COUNT_NAMES = frozenset({"num_classes", "n_classes", "nb_classes", "num_labels", "n_labels", "classes",
                               "num_outputs", "n_outputs", "out_features", "output_dim", "num_class"})
HPARAM_KEYS = ("hyper_parameters", "hparams", "hyperparameters", "config", "args", "cfg")
OPTIMIZER_KEYS = ("optimizer_states", "lr_schedulers", "optimizer", "optimizer_state_dict", "optimizers",
                  "scheduler", "lr_scheduler", "scheduler_state_dict", "amp_scaler", "scaler")


def retarget(wrapper: dict[str, Any], old: int, new: int) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``wrapper`` (the top-level dict around the weights) for a head of ``new`` classes, and notes."""
    top = copy.copy(wrapper)
    notes: list[str] = []
    changed: list[str] = []
    for path, holder, key in _class_counts(top, old):
        holder[key] = new
        changed.append(path)
    if changed:
        notes.append(f"set {', '.join(changed)} from {old} to {new} classes, so the checkpoint reloads in its "
                     f"framework with the new head")
    elif any(k in top for k in HPARAM_KEYS):
        where = next(k for k in HPARAM_KEYS if k in top)
        notes.append(f"{where} names no class count of {old}: if your module builds its head from another "
                     f"setting, set it to {new} when you load the checkpoint (e.g. "
                     f"Model.load_from_checkpoint(path, num_classes={new}))")
    dropped = [k for k in OPTIMIZER_KEYS if k in top]
    for k in dropped:
        del top[k]
    if dropped:
        notes.append(f"dropped {', '.join(dropped)}: they hold the optimizer's state for the old {old}-class head; "
                     "start the fine-tune's optimizer afresh (do not resume with Trainer(ckpt_path=...))")
    return top, notes


def _class_counts(top: dict[str, Any], old: int) -> list[tuple[str, dict, str]]:
    """(dotted path, holding dict, key) of every class count equal to ``old``; holding dicts are copied."""
    found: list[tuple[str, dict, str]] = []

    def visit(holder: dict, path: str, depth: int) -> None:
        for key in list(holder):
            value = holder[key]
            if isinstance(key, str) and key in CLASS_COUNT_NAMES and type(value) is int and value == old:
                found.append((f"{path}{key}", holder, key))
            elif isinstance(value, dict) and depth < 3 and (depth > 0 or key in HPARAM_KEYS):
                holder[key] = inner = copy.copy(value)
                visit(inner, f"{path}{key}.", depth + 1)

    visit(top, "", 0)
    return found
