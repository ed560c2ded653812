"""The optimizer step of a training loop, and the optimizer a config asks for.

    grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=1.0, lr_scheduler=scheduler,
                                   loss=loss_sum, run=run)

Every step checks its loss and gradient norm before updating (`training/nonfinite.py`): a NaN
or infinity stops the run, or with `on_nonfinite: skip` drops that step's update.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from tunewright.training.nonfinite import NonFiniteError, all_finite, describe


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
    loss: torch.Tensor | None = None,
    run: Any = None,
) -> tuple[torch.Tensor | None, float]:
    """Clip the gradients (when `clip_grad_norm` is set), step, zero the gradients, advance the
    schedule. Returns the gradient norm before clipping (a tensor on the parameters' device, so
    nothing waits for it until it is logged; None when the gradients are gone, as with an
    optimizer in backward) and the learning rate this step used.

    Before the update, a NaN or infinite `loss` (this rank's, e.g. the step's summed loss) or
    gradient norm on any rank is caught; `run.nonfinite(loss, grad_norm)` (training/run.py)
    then stops the run or has the update skipped; without `run`, `NonFiniteError` stops it."""
    lr = optimizer.param_groups[0]["lr"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = None
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    elif grads:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    if not all_finite([loss, grad_norm]):  # one small all-reduce, one host sync
        if run is None:
            raise NonFiniteError(f"non-finite loss ({describe(loss)}) or gradient norm "
                                 f"({describe(grad_norm)}): training stopped before the update")
        run.nonfinite(loss, grad_norm)  # raises to stop; returns to skip this update
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        with warnings.catch_warnings():  # a skipped first step: torch warns of the order, rightly here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            lr_scheduler.step()  # also when skipped: step N always has the schedule's lr for N
    return grad_norm, lr
