"""Non-finite values never train and are never saved.

`optimizer_step` checks the step's loss and gradient norm before it updates anything
(`all_finite`: one small all-reduce on the model's device and one host sync per step, so every
rank takes the same decision); the run's `on_nonfinite` says what follows: `stop` (default)
raises `NonFiniteError` naming the step, before the update, so no checkpoint or export holds
the values; `skip` drops the step's update, counts it, and stops once more than
`max_nonfinite_steps` were skipped. Checkpoints and exports check the trainable weights too
(`check_finite_parameters`): an update of finite gradients can still overflow.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tunewright.training import distributed as dist


class NonFiniteError(ValueError):
    """Training met a NaN or infinity: the one line says where and what to change."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (DTensor) value: non-finite there means non-finite in the whole."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _collective_device(fallback: torch.device) -> torch.device:
    """Where a collective's tensor must live: NCCL's GPU, else wherever the values are."""
    import torch.distributed

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def any_nonfinite(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 if any element of `values` (this rank's) is NaN or infinite, else 0.0; no host sync."""
    flags = [(~torch.isfinite(_local(v).detach())).any().reshape(1) for v in values]
    if not flags:
        return torch.zeros(())
    device = flags[0].device
    return torch.cat([f.to(device) for f in flags]).any().float()


def all_finite(values: Iterable[torch.Tensor | None]) -> bool:
    """Whether every value is finite on every rank: one all-reduce, one host sync."""
    bad = any_nonfinite([v for v in values if v is not None])
    if dist.is_distributed():
        import torch.distributed

        bad = bad.to(_collective_device(bad.device))
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # the world: TP ranks too
    return not bool(bad)


def check_finite_parameters(models: Iterable[nn.Module], where: object) -> None:
    """Refuse to write `where` if a trainable weight holds a NaN or infinity (collective: every
    rank calls it)."""
    params = [p for model in models for p in model.parameters() if p.requires_grad and p.numel()]
    if not all_finite(params):
        raise NonFiniteError(f"{where}: not written: the trained weights hold NaN or infinite values "
                             "(the updates diverged); lower optimizer.lr or set clip_grad_norm")


def describe(value: torch.Tensor | None) -> str:
    """A logged value for the one line (this rank's; `nan`, `inf`, or the number)."""
    if value is None:
        return "n/a"
    return f"{float(_local(value).detach().float().sum()):.4g}"
