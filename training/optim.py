"""The optimizer step of a training loop, and the optimizer a config asks for.

    grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=1.0, lr_scheduler=scheduler)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(optimizer_cfg: dict[str, Any], model: nn.Module, *, in_backward: bool = False) -> torch.optim.Optimizer:
    """The config's optimizer over `model`'s trainable parameters; `in_backward` steps each
    parameter inside backward instead (`training/optim_in_backward.py`)."""
    from tunewright.training.instantiate import instantiate

    params = trainable_parameters(model)
    if not in_backward:
        return instantiate(optimizer_cfg, params=params)
    from tunewright.training.optim_in_backward import OptimizerInBackward

    return OptimizerInBackward(params, lambda group: instantiate(optimizer_cfg, params=group))


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    *,
    clip_grad_norm: float | None = None,
    lr_scheduler: Any = None,
) -> tuple[torch.Tensor | None, float]:
    """Clip the gradients (when `clip_grad_norm` is set), step, zero the gradients, advance the
    schedule. Returns the gradient norm before clipping (a tensor on the parameters' device, so
    nothing waits for it until it is logged; None without clipping) and the learning rate this
    step used."""
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = None
    if clip_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return grad_norm, lr
