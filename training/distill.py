"""Knowledge-distillation losses: how far the student's next-token distribution is from the
teacher's, per target token, computed chunk by chunk from both models' hidden states so that
neither model's [tokens, vocab] logits ever exist whole.

With p_T, p_S the teacher's and student's softmax(logits / temperature) over the vocabulary:

    forward_kl       KL(p_T || p_S) = Σ p_T (log p_T - log p_S)     (mass-covering)
    reverse_kl       KL(p_S || p_T) = Σ p_S (log p_S - log p_T)     (mode-seeking; on-policy KD)
    symmetric_kl     (KL(p_T || p_S) + KL(p_S || p_T)) / 2
    generalized_jsd  β KL(p_T || M) + (1 - β) KL(p_S || M),  M = β p_T + (1 - β) p_S
                     (Agarwal et al. 2024, GKD, eq. 1, as TRL computes it: β = 0 gives
                     forward_kl, β = 1 reverse_kl)

Every one is 0 when the student is the teacher. torchtune's "forward KL" was the cross-entropy
-Σ p_T log p_S, which is KL(p_T || p_S) + H(p_T): the teacher's entropy where the student
equals the teacher, and the same gradient. Like TRL, no T² factor is applied for a temperature.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Kind = Literal["forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd"]
KINDS = ("forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [n, vocab] -> [n]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: Kind = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence [n] between the student's and teacher's logits [n, vocab] (fp32)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind == "symmetric_kl":
        return 0.5 * (_kl(log_t, log_s) + _kl(log_s, log_t))
    if kind == "generalized_jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] for generalized_jsd, got {beta}")
        if beta == 0.0:
            return _kl(log_t, log_s)
        if beta == 1.0:
            return _kl(log_s, log_t)
        log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)),
                                             log_s + torch.log1p(torch.tensor(-beta))]), dim=0)
        return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    raise ValueError(f"kd_loss must be one of {', '.join(KINDS)}, got {kind!r}")


def _chunk(student_head: Callable[[torch.Tensor], torch.Tensor], hs: torch.Tensor, teacher_logits: torch.Tensor,
           kind: Kind, beta: float, temperature: float) -> torch.Tensor:
    return divergence(student_head(hs), teacher_logits, kind=kind, beta=beta, temperature=temperature).sum()


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: torch.Tensor,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum over positions of `divergence` for hidden states [n, dim] of the target positions.
    Per chunk the teacher's logits are made without gradient and the student's under
    activation checkpointing (recomputed in backward), so at most one chunk of each exists."""
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student and teacher see different token counts ({student_hidden.shape[0]} vs "
                         f"{teacher_hidden.shape[0]}): they must read the same tokens")
    total = student_hidden.new_zeros((), dtype=torch.float32) + student_hidden.sum() * 0.0
    for start in range(0, student_hidden.shape[0], chunk_size):
        hs = student_hidden[start:start + chunk_size]
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[start:start + chunk_size])
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk, student_head, hs, teacher_logits, kind, beta, temperature,
                                       use_reentrant=False)
        else:
            total = total + _chunk(student_head, hs, teacher_logits, kind, beta, temperature)
    return total
