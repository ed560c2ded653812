"""The dtype a model computes in when its weights are kept in another (mixed precision).

`training/precision.py` decides the policy; this is the one place a model (and the loss
functions that use its output head) enter `torch.autocast` for it, so every caller — training
loss, reference log-probs, evaluation, generation — computes alike without knowing about it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

_ATTR = "autocast_dtype"


def set_autocast_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Make `model` (and `compute_autocast(model, ...)`) run its matmuls in `dtype`; None: off."""
    setattr(model, _ATTR, dtype)


def compute_autocast(model: nn.Module, device: torch.device) -> ContextManager:
    """`torch.autocast` to the model's compute dtype on `device`, or nothing if it has none.
    Entering it again inside itself (the loss around the model's forward) changes nothing."""
    dtype = getattr(model, _ATTR, None)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
