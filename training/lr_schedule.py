"""Learning-rate schedules as `LambdaLR`s (their state is plain numbers: resumable, picklable)."""

from __future__ import annotations

import math
from typing import Callable

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

    def cosine(progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))

    return _warmup_then(optimizer, cosine, num_training_steps=num_training_steps,
                        num_warmup_steps=num_warmup_steps, min_lr_ratio=min_lr_ratio)


def _warmup_then(optimizer: Optimizer, decay: Callable[[float], float], *, num_training_steps: int,
                 num_warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up from 0, then `decay(progress)` (progress 0 -> 1 over the remaining steps,
    held at 1 after them) lifted onto [min_lr_ratio, 1]."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay(min(progress, 1.0))

    return LambdaLR(optimizer, factor)


def constant_with_warmup(
    optimizer: Optimizer, *, num_training_steps: int, num_warmup_steps: int = 0
) -> LambdaLR:
    del num_training_steps  # same signature as the others so configs can swap them
    return LambdaLR(optimizer, lambda step: min(1.0, step / max(1, num_warmup_steps)) if num_warmup_steps else 1.0)


def rex_with_warmup(
    optimizer: Optimizer,
    *,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    rex_beta: float = 0.5,
) -> LambdaLR:
    """Linear warm-up from 0, then REX decay (Chen, Wolfe & Kyrillidis, MLSys 2022, arXiv 2107.04197).

    With progress z = (step - warmup) / (total - warmup), the paper's schedule is
        lr(z) = lr0 * (1 - z) / (1/2 + 1/2 * (1 - z))
    i.e. `rex_beta = 0.5` in  (1 - z) / ((1 - beta) + beta * (1 - z)). It falls more slowly than
    linear early and faster at the end. Axolotl's `rex` scheduler is this family with beta 0.9
    (its `rex_alpha=0.1, rex_beta=0.9`); pass `rex_beta: 0.9` to get its curve. `min_lr_ratio`
    lifts the floor the way `cosine_with_warmup`'s does.
    """
    if not 0.0 < rex_beta <= 1.0:
        raise ValueError(f"lr_scheduler.rex_beta must be in (0, 1], got {rex_beta}")

    def rex(progress: float) -> float:
        return (1.0 - progress) / ((1.0 - rex_beta) + rex_beta * (1.0 - progress))

    return _warmup_then(optimizer, rex, num_training_steps=num_training_steps,
                        num_warmup_steps=num_warmup_steps, min_lr_ratio=min_lr_ratio)
