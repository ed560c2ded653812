"""Objective pieces a recipe's loop calls: the SFT loss, log-probs of the target tokens, and a
held-out loss. All of them run the decoder to its hidden states and apply the output head chunk
by chunk on the target positions only, so no [batch, seq, vocab] logits tensor ever exists.

    loss_sum, n = causal_lm_loss(model, batch)           # SFT: sum of -log p over n targets
    logp, rows = token_logprobs(model, batch)            # per target token, with gradients
    sums, counts = sequence_logprobs(model, batch)       # per row: DPO's log pi(y|x)
    val = evaluate_loss(model, val_batches, causal_lm_loss, device=device).loss

A batch is a collated dict (`data/collate.py`: `tokens`, `labels` already shifted with -100 on
positions that do not count, `seq_lens` or packed `doc_ids`/`input_pos`), or the padding-free
form `collate_flat` makes on the host ([1, T], `seq_lens`, `row_ids`, `num_rows`). `padding_free`
computes only the real tokens (`training/unpad.py`), with the same values as the padded batch up
to float rounding.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunewright.data.tokenizer.base import IGNORE_INDEX
from tunewright.modules.precision import compute_autocast
from tunewright.training.batching import Batch, Batches, global_sum, to_device

LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


def hidden_states(model: nn.Module, batch: Batch, *, padding_free: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed hidden states [b', s', dim], labels [b', s'], row of the batch of each position
    [b', s']): [1, T] when padding-free, the batch's own [b, s] otherwise. A batch collated
    padding-free (`collate_flat`) is used as it is, whatever `padding_free` says: it has no
    padding to put back. A padded batch with `padding_free` is flattened here (on a GPU that
    reads lengths back, which a training loop avoids by collating flat)."""
    from tunewright.training.unpad import flatten_batch, is_flat

    if "attn_mask" in batch:  # rows laid out with an explicit mask (`grpo.shared_prompt_batch`)
        hidden = model(batch["tokens"], input_pos=batch["input_pos"], attn_mask=batch["attn_mask"], hidden_only=True)
        return hidden, batch["labels"], batch["target_rows"]
    if not is_flat(batch) and padding_free and ("seq_lens" in batch or "doc_ids" in batch):
        batch = flatten_batch(batch)
    if is_flat(batch):
        hidden = model(batch["tokens"], input_pos=batch["input_pos"], seq_lens=batch["seq_lens"], hidden_only=True)
        return hidden, batch["labels"], batch["row_ids"]
    hidden = model(batch["tokens"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"),
                   hidden_only=True)
    labels = batch["labels"]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return hidden, labels, rows


def _target_index(batch: Batch) -> torch.Tensor | None:
    """The host-made target positions of a flat batch (`collate_flat`), None otherwise."""
    from tunewright.training.unpad import is_flat

    return batch.get("target_index") if is_flat(batch) else None


def causal_lm_loss(
    model: nn.Module, batch: Batch, *, chunk_size: int = 1024, padding_free: bool = True
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's targets, and their number (the caller
    divides, so accumulation can normalise by the targets of a whole step). The head and the
    loss are fused where the head is a plain linear map (`modules/loss.py`)."""
    from tunewright.modules.loss import chunked_cross_entropy

    with compute_autocast(model, batch["tokens"].device):  # the head too computes in bf16 under mixed precision
        hidden, labels, _ = hidden_states(model, batch, padding_free=padding_free)
        return chunked_cross_entropy(hidden, labels, model.head, chunk_size=chunk_size,
                                     head_weight=model.head_weight(), target_index=_target_index(batch))


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(dim=-1)


def token_logprobs(
    model: nn.Module,
    batch: Batch,
    *,
    chunk_size: int = 1024,
    padding_free: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of every target token in batch order ([n] float32, differentiable) and the
    batch row of each ([n] int64). With gradients on, each chunk's logits are recomputed in
    backward rather than kept, so memory stays at one chunk of logits."""
    with compute_autocast(model, batch["tokens"].device):
        return _token_logprobs(model, batch, chunk_size, padding_free, temperature)


def _token_logprobs(model: nn.Module, batch: Batch, chunk_size: int, padding_free: bool,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    from tunewright.modules.loss import select_targets

    hidden, labels, rows = hidden_states(model, batch, padding_free=padding_free)
    index = _target_index(batch)
    h, t = select_targets(hidden, labels, index)  # [n, dim], [n]
    rows = rows[0].index_select(0, index) if index is not None else rows[labels != IGNORE_INDEX]
    chunks = []
    for start in range(0, t.numel(), chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            chunks.append(checkpoint(_chunk_logprobs, model.head, hc, tc, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(model.head, hc, tc, temperature))
    logp = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0.0
    return logp, rows


def per_row_sum(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum of `values` [n] per row id in [0, num_rows): a one-hot matmul, which (unlike
    `index_add_`) gives the same bits on every run, also on GPUs."""
    one_hot = rows[None, :] == torch.arange(num_rows, device=rows.device)[:, None]  # [num_rows, n]
    return one_hot.to(values.dtype) @ values


def sequence_logprobs(
    model: nn.Module, batch: Batch, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the sum of its target tokens' log-probs ([b], differentiable) and
    their number ([b]); a packed row counts as one sequence. Options as `token_logprobs`."""
    logp, rows = token_logprobs(model, batch, **options)
    num_rows = batch.get("num_rows", batch["labels"].shape[0])  # a flat batch's labels are [1, T]
    counts = per_row_sum(torch.ones_like(logp), rows, num_rows).detach()
    return per_row_sum(logp, rows, num_rows), counts


class HeldOut(NamedTuple):
    loss: torch.Tensor  # mean per-token loss, 0-d, on the model's device
    num_targets: torch.Tensor  # the target tokens it is the mean over


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    *,
    device: torch.device | str,
    max_batches: int | None = None,
) -> HeldOut:
    """Mean of `loss_fn`'s per-token loss over the targets of `batches` (from their start, at
    most `max_batches` of them) and all data-parallel ranks, summed in fp64. The model is in
    eval mode meanwhile (no dropout), then back in the mode it was in. Batches without a
    single target token are a ValueError: a mean over nothing has no value, and 0.0 would
    read as a perfect model."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_eval_batches must be at least 1 (null: every batch), got {max_batches}")
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets
    for batch in itertools.islice(batches.first_epoch(), max_batches):
        loss, n = loss_fn(model, to_device(batch, device))
        totals[0] += loss.double()
        totals[1] += n
    global_sum(totals)
    model.train(was_training)
    if totals[1] == 0:  # the same sum on every rank: all of them raise
        first = f"the first {max_batches} " if max_batches is not None else ""
        raise ValueError(f"held-out loss: {first}validation batches hold no target token, so there "
                         f"is no loss to report (every row's reply cut off by max_seq_len?)")
    return HeldOut(totals[0] / totals[1], totals[1])
