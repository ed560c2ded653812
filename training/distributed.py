"""Rank facts and collectives that are no-ops in a single process, so the training core is the
same code under torchrun."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


# With tensor parallelism, the ranks of one tensor-parallel group see the same data: losses,
# target counts and data shards go by the data-parallel group (the whole world by default).
_DATA_PARALLEL_GROUP = None


def set_data_parallel_group(group: dist.ProcessGroup | None) -> None:
    global _DATA_PARALLEL_GROUP
    _DATA_PARALLEL_GROUP = group


def data_rank() -> int:
    return dist.get_rank(_DATA_PARALLEL_GROUP) if is_distributed() else 0


def data_world_size() -> int:
    return dist.get_world_size(_DATA_PARALLEL_GROUP) if is_distributed() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_DATA_PARALLEL_GROUP)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()
