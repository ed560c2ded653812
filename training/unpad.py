"""Padding-free batches: the real tokens of every row laid end to end as one sequence.

A padded batch [b, s] spends compute on padding in every matmul; a packed row spends attention
across documents unless masked. Flattening keeps only real tokens, [1, T] with T = the batch's
non-padding tokens, plus the length of each sequence so attention runs causally within each
(`seq_lens` of the decoder) and RoPE positions restart. The maths per sequence is unchanged; the
matmuls get one tall operand, which CPUs and GPUs both run near peak.
"""

from __future__ import annotations

from typing import Any

import torch


def _segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Real-token mask and lengths of consecutive documents of packed rows (doc id -1 = pad)."""
    keep = doc_ids >= 0
    flat = doc_ids[keep]
    row = torch.arange(doc_ids.shape[0], device=doc_ids.device)[:, None].expand_as(doc_ids)[keep]
    # a new segment starts wherever the (row, doc) pair changes
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
    starts = change.nonzero().flatten().tolist() + [flat.numel()]
    return keep, [b - a for a, b in zip(starts, starts[1:])]


def flatten_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """tokens/labels [b, s] (+ input_pos, doc_ids when packed; seq_lens when padded) ->
    tokens/labels/input_pos/row_ids [1, T] and `seq_lens`; `row_ids` is each token's row of the
    batch (per-row sums, e.g. sequence log-probs, read it)."""
    tokens, labels = batch["tokens"], batch["labels"]
    if "doc_ids" in batch:
        keep, seq_lens = _segments(batch["doc_ids"])
    else:
        lengths = batch["seq_lens"]
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        keep = pos[None, :] < torch.as_tensor(lengths, device=tokens.device)[:, None]
        seq_lens = [int(n) for n in lengths if int(n) > 0]
    input_pos = torch.cat([torch.arange(n, device=tokens.device) for n in seq_lens])
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(tokens)
    return {"tokens": tokens[keep][None], "labels": labels[keep][None], "input_pos": input_pos[None],
            "row_ids": rows[keep][None], "seq_lens": seq_lens}
