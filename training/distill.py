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

A recipe's step calls `distillation_loss(student, teacher, batch, kd_ratio=...)`: one forward of
each model, the SFT cross-entropy and the divergence summed over the batch's target tokens
(the dataset's replies, or the student's own samples in on-policy distillation).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
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
    return log_prob_divergence(log_s, log_t, kind=kind, beta=beta)


def log_prob_divergence(log_s: torch.Tensor, log_t: torch.Tensor, *, kind: Kind = "forward_kl",
                        beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence [n] between two distributions given as log-probabilities [n, m] (the
    whole vocabulary, or the teacher's cached top-k plus the rest: `training/teacher_cache.py`)."""
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


def _chunk(student_head: Callable[[torch.Tensor], torch.Tensor], hs: torch.Tensor, teacher_logits: Any,
           kind: Kind, beta: float, temperature: float) -> torch.Tensor:
    if not isinstance(teacher_logits, torch.Tensor):  # the teacher's cached top-k (`teacher_cache.TopK`)
        return teacher_logits.divergence(student_head(hs), kind=kind, beta=beta, temperature=temperature).sum()
    return divergence(student_head(hs), teacher_logits, kind=kind, beta=beta, temperature=temperature).sum()


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: Any,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    on_teacher_logits: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sum over positions of `divergence` for hidden states [n, dim] of the target positions.
    Per chunk the teacher's logits are made without gradient and the student's under
    activation checkpointing (recomputed in backward), so at most one chunk of each exists.
    `teacher_hidden` may instead be the teacher's cached top-k of those positions (a
    `teacher_cache.TopK`, `teacher_head` None); `on_teacher_logits` sees each chunk's logits."""
    if student_hidden.shape[0] != len(teacher_hidden):
        raise ValueError(f"student and teacher see different token counts ({student_hidden.shape[0]} vs "
                         f"{len(teacher_hidden)}): they must read the same tokens")
    total = student_hidden.new_zeros((), dtype=torch.float32) + student_hidden.sum() * 0.0
    for start in range(0, student_hidden.shape[0], chunk_size):
        hs = student_hidden[start:start + chunk_size]
        with torch.no_grad():
            teacher_logits = teacher_hidden[start:start + chunk_size]
            if teacher_head is not None:
                teacher_logits = teacher_head(teacher_logits)
                if on_teacher_logits is not None:
                    on_teacher_logits(teacher_logits)
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk, student_head, hs, teacher_logits, kind, beta, temperature,
                                       use_reentrant=False)
        else:
            total = total + _chunk(student_head, hs, teacher_logits, kind, beta, temperature)
    return total


class DistillSums(NamedTuple):
    loss: torch.Tensor  # (1 - kd_ratio) * ce + kd_ratio * kd: what backward runs on
    ce: torch.Tensor  # the student's cross-entropy on the targets, summed (no gradient)
    kd: torch.Tensor  # the divergence to the teacher, summed over the targets (no gradient)
    num_targets: int


def _own_precision(model: nn.Module, device: torch.device) -> AbstractContextManager[Any]:
    """The model's own compute dtype: its autocast (mixed precision), or none at all, also
    inside the other model's autocast (a teacher stored in fp32 next to a bf16 student)."""
    from tunewright.modules.precision import compute_autocast

    if getattr(model, "autocast_dtype", None) is not None:
        return compute_autocast(model, device)
    return torch.autocast(device.type, enabled=False)


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Any],
    *,
    kd_ratio: float = 1.0,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    padding_free: bool = True,
    teacher_top_k: Any = None,
    on_teacher_logits: Callable[[torch.Tensor], None] | None = None,
) -> DistillSums:
    """Sums over the batch's target tokens (labels != -100) of the student's cross-entropy and
    of `divergence(student, teacher)` at each target position, from one forward of each model;
    the caller divides by the step's targets, as the SFT recipe does. A term weighted 0 (kd_ratio
    0 or 1) is computed without gradient, for the log only. With `teacher_top_k` (the teacher's
    cached top-k at the batch's targets, `training/teacher_cache.py`) the teacher does not run;
    otherwise `on_teacher_logits` sees its logits at the targets, chunk by chunk, in order."""
    from tunewright.data.tokenizer.base import IGNORE_INDEX
    from tunewright.modules.loss import chunked_cross_entropy
    from tunewright.training.objectives import hidden_states

    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    device = batch["tokens"].device
    if teacher_top_k is None:
        with torch.no_grad(), _own_precision(teacher, device):
            teacher_hidden, _, _ = hidden_states(teacher, batch, padding_free=padding_free)

    def teacher_head(h: torch.Tensor) -> torch.Tensor:
        with _own_precision(teacher, device):
            return teacher.head(h)

    grad = torch.is_grad_enabled()
    with _own_precision(student, device):
        hidden, labels, _ = hidden_states(student, batch, padding_free=padding_free)
        with torch.set_grad_enabled(grad and kd_ratio < 1):
            ce, n = chunked_cross_entropy(hidden, labels, student.head, chunk_size=chunk_size,
                                          head_weight=student.head_weight())
        keep = labels != IGNORE_INDEX
        with torch.set_grad_enabled(grad and kd_ratio > 0):
            teacher_side = (teacher_hidden[keep], teacher_head) if teacher_top_k is None else (teacher_top_k, None)
            kd = chunked_divergence(hidden[keep], student.head, *teacher_side, kind=kind, beta=beta,
                                    temperature=temperature, chunk_size=chunk_size, on_teacher_logits=on_teacher_logits)
    # Only the weighted terms: kd_ratio 0 is the SFT loss bit for bit.
    loss = (1.0 - kd_ratio) * ce if kd_ratio < 1 else kd_ratio * kd
    if 0 < kd_ratio < 1:
        loss = loss + kd_ratio * kd
    return DistillSums(loss, ce.detach(), kd.detach(), n)


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's tokens before its first target, the prompt its reply answers, from a collated
    batch (padded [b, s] or padding-free [1, T] with `row_ids`) on the host."""
    from tunewright.data.tokenizer.base import IGNORE_INDEX

    tokens, labels = batch["tokens"].reshape(-1).cpu(), batch["labels"].reshape(-1).cpu()
    if "row_ids" in batch:
        rows, num_rows = batch["row_ids"].reshape(-1).cpu(), int(batch["num_rows"])
        packed = len(batch["seq_lens"]) != num_rows
    else:
        num_rows, width = batch["labels"].shape
        rows, packed = torch.arange(num_rows).repeat_interleave(width), "doc_ids" in batch
    if packed:
        raise ValueError("dataset: on-policy distillation samples one reply per row, and packed rows hold "
                         "several; set dataset.packed: false")
    prompts = []
    for row in range(num_rows):
        at = (rows == row).nonzero().squeeze(1)
        targets = (labels[at] != IGNORE_INDEX).nonzero()
        if targets.numel() == 0:
            raise ValueError(f"row {row} of a batch has no target token: no prompt/reply boundary to sample from")
        prompts.append(tokens[at[: int(targets[0]) + 1]].tolist())  # label i is token i + 1: keep token i
    return prompts


def check_same_vocabulary(student_model: dict[str, Any], teacher_model: dict[str, Any], *, key: str = "teacher_model",
                          student: str = "student",
                          why: str = "distillation compares the two models' next-token distributions id by id; "
                                     "use a teacher of the student's tokenizer") -> None:
    """ValueError, before any weight loads, when the teacher's vocabulary is not the student's:
    another vocab_size in config.json, or a tokenizer.json mapping a token to another id. The
    divergence compares the two models' distributions id by id, so they must mean the same.
    `key`, `student` and `why` name other models that read one tokenizer's ids (PPO's policy and
    its value model)."""
    import json
    from pathlib import Path

    from tunewright.training.data_setup import model_vocab

    student_dir, student_vocab = model_vocab(student_model)
    teacher_dir, teacher_vocab = model_vocab(teacher_model)
    if student_dir is None or teacher_dir is None:
        return  # a model built in code: its vocabulary shows in the logits' width
    if student_vocab != teacher_vocab:
        raise ValueError(f"{key}: {teacher_dir / 'config.json'} has vocab_size {teacher_vocab}, the {student}'s "
                         f"{student_dir / 'config.json'} {student_vocab}: {why}")

    def token_ids(directory: Path) -> dict[str, int] | None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab = spec.get("model", {}).get("vocab", {})
        ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}
        ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        return ids

    student_ids, teacher_ids = token_ids(student_dir), token_ids(teacher_dir)
    if student_ids is None or teacher_ids is None or student_ids == teacher_ids:
        return
    token = next(t for t in sorted(set(student_ids) | set(teacher_ids)) if student_ids.get(t) != teacher_ids.get(t))
    raise ValueError(f"{key}: {teacher_dir / 'tokenizer.json'} maps {token!r} to id {teacher_ids.get(token)}, the "
                     f"{student}'s {student_dir / 'tokenizer.json'} to {student_ids.get(token)}: {why}")


def evaluate_distillation(student: nn.Module, batches: Any, loss_fn: Callable[[dict[str, Any]], DistillSums], *,
                          device: torch.device | str, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """The student's held-out cross-entropy (`val_loss`) and divergence to the teacher
    (`val_kd_loss`), each per target token of `batches`; `loss_fn(batch)` is the recipe's
    `distillation_loss` with its options (one pass per value)."""
    from tunewright.training.objectives import evaluate_loss

    def term(index: int) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int]]:
        def value(_: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
            sums = loss_fn(batch)
            return sums[index], sums.num_targets
        return value

    return {name: evaluate_loss(student, batches, term(index), device=device, max_batches=max_batches).loss
            for name, index in (("val_loss", 1), ("val_kd_loss", 2))}
