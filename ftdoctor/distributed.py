"""Scale-out under ``torchrun`` (SPEC §7): shard the data, all-reduce what adds up.

``torchrun --nproc_per_node N -m ftdoctor probe ...`` starts N processes with
``RANK``/``WORLD_SIZE`` set; :func:`setup` joins them into a process group
(gloo on CPU, nccl on CUDA). ``--batch-size`` stays the *global* batch: global
batch b is the index range ``[bB, (b+1)B)`` of the single-process run, and rank
r takes every W-th index of it starting at r (DistributedSampler's strided
order), so no example is dropped or doubled and uneven tails simply leave some
ranks with fewer (or no) examples. Per-batch gradients are summed across ranks
before any probe sees them, as DDP does, and the probes' sufficient statistics
are summed once at the end; rank 0 alone prints and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ftdoctor import forward


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world = World()


def world() -> World:
    return _world


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device: str = "cpu") -> World:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (idempotent); a single process otherwise."""
    global _world
    if env_world_size() <= 1:
        return _world
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _world = World(rank=dist.get_rank(), size=dist.get_world_size())
    return _world


def teardown() -> None:
    global _world
    if _world.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    _world = World()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks :func:`setup` joined (a no-op in a single process)."""
    return sum_over_ranks(t) if _world.distributed else t


def loop_is_distributed() -> bool:
    """Whether the caller's own process group spans more than one process (torchrun, Accelerate, Lightning's
    strategies set it up; a training loop's live monitor sums over it)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0 of the caller's own process group, or a process without one: the one that writes and warns."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` summed over every process of the initialised process group."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        # nccl reduces only CUDA tensors; a few small counters live on the CPU
        out = t.detach().to(torch.device("cuda", torch.cuda.current_device())).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)
    out = t.detach().clone(memory_format=torch.contiguous_format)   # collectives take dense row-major tensors
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_batches(num_samples: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


class _Collate:
    """Stack (x, y, index) items; an empty shard yields zero-length tensors shaped like the data."""

    def __init__(self, example: tuple) -> None:
        self.example = example[0]      # the inputs of one example: a tensor or a mapping of tensors

    def __call__(self, items: list) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if not items:
            return forward.empty_batch(self.example), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        xs, ys, idx = zip(*items)
        return forward.stack(xs), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long)


def sharded_batches(dataset: Dataset, batch_size: int, world: World, workers: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(x, y, index, global batch size) for this rank's share of every global batch, in order."""
    n = len(dataset)  # type: ignore[arg-type]
    batches = global_batches(n, batch_size)
    local = [list(b[world.rank::world.size]) for b in batches]
    if n == 0:
        return
    loader = DataLoader(dataset, batch_sampler=local, num_workers=workers, collate_fn=_Collate(dataset[0]))
    for (x, y, idx), b in zip(loader, batches):
        yield x, y, idx, len(b)
