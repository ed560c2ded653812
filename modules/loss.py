"""Cross-entropy over the output head in chunks, on target positions only.

Full logits for a batch are `b * s * vocab` floats (4 x 512 x 49k x 4 B = 400 MB for SmolLM2),
and their gradient as much again. Here the hidden states of the positions that have a target
are gathered first (prompt and padding cost nothing), then the head and the loss run chunk by
chunk, so at most one chunk of logits exists at a time.

For a plain linear head (tied or not) the gradient is computed in the same pass: per chunk,
d loss / d logits = softmax - onehot, so d hidden = that @ W, and the logits are dropped at
once (`LinearCrossEntropy`: no recompute in backward, the FLOPs of the unchunked loss). Any
other head (an adapted or soft-capped one) runs chunk by chunk under activation checkpointing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunewright.data.tokenizer.base import IGNORE_INDEX


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) with its gradient computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (hc @ weight.t()).float()  # [chunk, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0
                probs = probs.to(h.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = probs @ weight
                if need_w:
                    grad_w += (probs.t() @ hc).float()
        # Kept on ctx, not `save_for_backward`: they are gradients already computed, not
        # activations, so saved-tensor hooks (activation offloading) must not move them (the fp32
        # head gradient is vocab x dim: 1 GB for a 128k vocabulary at dim 2048).
        ctx.grads = (grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.grads
        del ctx.grads  # freed with this backward, as saved tensors would be
        grad_h = (grad_h * grad_out).to(ctx.h_dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None


def select_targets(hidden: torch.Tensor, labels: torch.Tensor,
                   target_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states [n, dim] and labels [n] of the positions that have a target: by
    `target_index` into a [1, T] batch when given (no sync), else by mask."""
    if target_index is not None:
        return hidden[0].index_select(0, target_index), labels[0].index_select(0, target_index)
    keep = labels != IGNORE_INDEX
    return hidden[keep], labels[keep]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 1024,
    head_weight: torch.Tensor | None = None,
    target_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """hidden [b, s, dim], labels [b, s] (already shifted; IGNORE_INDEX skipped).

    `head_weight`, when the head is exactly `h @ head_weight.T`, takes the fused path.
    `target_index` (flat [1, T] batches: the positions of the targets, made on the host) picks
    the targets by index, so their count is known without reading a mask back from a GPU.
    Returns (sum of the per-token losses, number of target tokens); the caller divides, so
    gradient accumulation can normalise by the targets of the whole optimizer step.
    """
    h, t = select_targets(hidden, labels, target_index)  # [n_targets, dim], [n_targets]
    n = t.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + hidden.sum() * 0.0, 0  # keeps the graph so backward still runs
    if head_weight is not None and torch.is_grad_enabled():  # without grad: the plain loop
        return LinearCrossEntropy.apply(h, head_weight, t, chunk_size), n
    for start in range(0, n, chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_loss, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, tc)
    return total, n
