"""Cross-entropy over the output head in chunks, on target positions only.

Full logits for a batch are `b * s * vocab` floats (4 x 512 x 49k x 4 B = 400 MB for SmolLM2),
and their gradient as much again. Here the hidden states of the positions that have a target
are gathered first (prompt and padding cost nothing), then the head and the loss run chunk by
chunk under activation checkpointing, so at most one chunk of logits exists at a time, in the
forward pass and again in the backward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunewright.data.tokenizer.base import IGNORE_INDEX


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """hidden [b, s, dim], labels [b, s] (already shifted; IGNORE_INDEX skipped).

    Returns (sum of the per-token losses, number of target tokens); the caller divides, so
    gradient accumulation can normalise by the targets of the whole optimizer step.
    """
    keep = labels != IGNORE_INDEX
    h = hidden[keep]  # [n_targets, dim]
    t = labels[keep]
    n = t.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + hidden.sum() * 0.0, 0  # keeps the graph so backward still runs
    for start in range(0, n, chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_loss, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, tc)
    return total, n
