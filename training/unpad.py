"""Padding-free batches: the real tokens of every row laid end to end as one sequence.

A padded batch [b, s] spends compute on padding in every matmul; a packed row spends attention
across documents unless masked. Flattening keeps only real tokens, [1, T] with T = the batch's
non-padding tokens, plus the length of each sequence so attention runs causally within each
(`seq_lens` of the decoder) and RoPE positions restart. The maths per sequence is unchanged; the
matmuls get one tall operand, which CPUs and GPUs both run near peak.

Training batches are flattened on the host, as they are collated (`data/collate.py`
`collate_flat`, chosen by `padding_free`): `is_flat` tells them apart. `flatten_batch` does the
same to a padded batch that is already built (by hand, or by `collate_padded`); on a GPU it reads
lengths back from the device, so the training loop never calls it.
"""

from __future__ import annotations

from typing import Any

import torch

from tunewright.data.collate import positions, sequence_lengths
from tunewright.data.packing import PAD_DOC_ID


def is_flat(batch: dict[str, Any]) -> bool:
    """A padding-free batch: [1, T] tokens with `row_ids` and `seq_lens` of its sequences."""
    return "row_ids" in batch


def flatten_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """tokens/labels [b, s] (+ input_pos, doc_ids when packed; seq_lens when padded) -> the
    batch `collate_flat` makes of the same items: tokens/labels/input_pos/row_ids [1, T],
    `seq_lens` and `num_rows`; `row_ids` is each token's row of the batch (per-row sums, e.g.
    sequence log-probs, read it). Counts the batch has are kept."""
    tokens, labels = batch["tokens"], batch["labels"]
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(tokens)
    if "doc_ids" in batch:
        keep = batch["doc_ids"] != PAD_DOC_ID
        seq_lens = sequence_lengths(rows[keep], batch["doc_ids"][keep])
    else:
        lengths = batch["seq_lens"]
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        keep = pos[None, :] < torch.as_tensor(lengths, device=tokens.device)[:, None]
        seq_lens = [int(n) for n in lengths if int(n) > 0]
    counts = {key: batch[key] for key in ("num_tokens", "num_targets") if key in batch}
    return {"tokens": tokens[keep][None], "labels": labels[keep][None],
            "input_pos": positions(seq_lens).to(tokens.device, non_blocking=True)[None],
            "row_ids": rows[keep][None], "seq_lens": seq_lens, "num_rows": tokens.shape[0], **counts}
