"""Which examples ``--max-samples N`` keeps: a seeded, class-stratified subset, or the first N (``--subset``).

An ImageFolder lists its images class by class, and many array files are
sorted by label: "the first N" of such a split is one or two classes. The
default therefore draws, for a split of M examples of which ``m_c`` have class
c, ``n_c`` examples of every class c with ``n_c`` proportional to ``m_c``
(largest-remainder rounding, ties to the lower class index, so Σ n_c = N), each
class's ``n_c`` drawn uniformly without replacement by a generator seeded
with ``--seed``. The kept examples stay in dataset order. The draw depends on
the labels and the seed only — not on the batch size, the workers or the
number of processes — so the same ``--seed`` gives the same examples, hence
the same figures. ``--subset first`` keeps the first N, as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

SUBSETS = ("stratified", "first")


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices of ``labels``, every class in proportion (see the module doc), ascending."""
    labels = np.asarray(labels, dtype=np.int64)
    if n >= labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / labels.size)
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((classes, -(exact - quota)))       # largest remainder first, then the lower class
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5AB5E7])))
    picks = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        picks.append(members[rng.permutation(members.size)[:q]])
    return np.sort(np.concatenate(picks)) if picks else np.arange(0)


class SubsetSplit:
    """A split seen through ``indices``: item i is the source's item ``indices[i]``."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(source.labels)[self.indices], dtype=torch.int64)
        self.num_classes = source.num_classes
        self.resize_to_first = getattr(source, "resize_to_first", False)

    def read(self, indices: Sequence[int]) -> Tensor | list[Tensor]:
        return self.source.read([int(self.indices[int(i)]) for i in indices])

    def first_shape(self) -> tuple[int, int, int]:
        if hasattr(self.source, "first_shape") and int(self.indices[0]) == 0:
            return self.source.first_shape()
        first = self.read([0])
        first = first[0] if isinstance(first, list) else first[0]
        return tuple(int(s) for s in first.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Drawn:
    """How the examples were chosen, for reports: ``mode`` (stratified | first | all), of ``total``."""

    mode: str
    kept: int
    total: int | None      # None: not counted (--subset first reads no further than it keeps)
    seed: int

    def describe(self) -> str:
        if self.mode == "all":
            return f"all {self.total} examples"
        if self.mode == "first":
            return f"the first {self.kept} examples in dataset order (--subset first)"
        return f"{self.kept} of {self.total} examples, every class in proportion (seed {self.seed})"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "kept": self.kept, "total": self.total,
                "seed": self.seed if self.mode == "stratified" else None}


def draw(source: Any, max_samples: int | None, mode: str, seed: int) -> tuple[Any, Drawn]:
    """The split ``--max-samples`` / ``--subset`` keep of ``source``, and how it was drawn. ``source`` is
    uncapped for ``stratified``; for ``first`` the data source has capped it already (reading no further)."""
    total = len(source.labels)
    if mode == "first":
        return source, Drawn("first" if max_samples is not None and total >= max_samples else "all", total,
                             None if max_samples is not None and total >= max_samples else total, seed)
    if max_samples is None or max_samples >= total:
        return source, Drawn("all", total, total, seed)
    indices = stratified_indices(np.asarray(source.labels), max_samples, seed)
    select = getattr(source, "select", None)
    return (select(indices) if callable(select) else SubsetSplit(source, indices)), Drawn(mode, max_samples,
                                                                                           total, seed)


def describe(block: dict[str, Any] | None, seen: int | None = None) -> str:
    """A report's ``data.subset`` block in words: "512 of 4096 examples, every class in proportion (seed 0)"."""
    if not block:
        return f"{seen} examples" if seen is not None else ""
    drawn = Drawn(block["mode"], int(block["kept"]), block.get("total"), int(block.get("seed") or 0))
    return drawn.describe()
