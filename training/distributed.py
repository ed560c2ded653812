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


# The device every collective's tensors must be on: the model's. NCCL rejects CPU tensors, gloo
# takes them, so without this check a CPU tensor in a collective passes every CPU test and
# kills the first GPU run at step 1.
_COLLECTIVE_DEVICE: torch.device | None = None


def set_collective_device(device: torch.device | str | None) -> None:
    global _COLLECTIVE_DEVICE
    _COLLECTIVE_DEVICE = torch.device(device) if device is not None else None


def check_collective_device(x: torch.Tensor) -> None:
    expected = _COLLECTIVE_DEVICE
    if expected is not None and x.device.type != expected.type:
        raise RuntimeError(f"a collective got a tensor on {x.device} in a run on {expected}: create it on the "
                           "model's device (NCCL takes no CPU tensors)")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel group."""
    if is_distributed():
        check_collective_device(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_DATA_PARALLEL_GROUP)
    return x


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether `flag` holds on any data-parallel rank (one small all-reduce; no-op alone), for
    decisions every rank must take together, e.g. one more forward that gathers weights."""
    if not is_distributed():
        return flag
    return all_reduce_sum(torch.tensor(1.0 if flag else 0.0, device=device)).item() > 0


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over the data-parallel group."""
    if is_distributed():
        check_collective_device(x)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_DATA_PARALLEL_GROUP)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()
