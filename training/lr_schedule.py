"""Learning-rate schedules as `LambdaLR`s (their state is plain numbers: resumable, picklable)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: Optimizer,
    *,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> LambdaLR:
    """Linear warm-up from 0, then cosine decay to `min_lr_ratio * lr` at the last step."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * min(progress, 1.0)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return LambdaLR(optimizer, factor)


def constant_with_warmup(
    optimizer: Optimizer, *, num_training_steps: int, num_warmup_steps: int = 0
) -> LambdaLR:
    del num_training_steps  # same signature as the others so configs can swap them
    return LambdaLR(optimizer, lambda step: min(1.0, step / max(1, num_warmup_steps)) if num_warmup_steps else 1.0)
