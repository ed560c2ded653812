"""Batching: right-pad a list of items into ``[b, s]`` LongTensors.

Use with a DataLoader as ``collate_fn=functools.partial(collate_padded, pad_id=tok.pad_id)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tunewright.data.packing import PAD_DOC_ID
from tunewright.data.tokenizer.base import IGNORE_INDEX

_OPTIONAL_KEYS = ("input_pos", "doc_ids")  # present on packed items


def collate_padded(
    batch: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Stack items, right-padding to the longest (rounded up to `pad_to_multiple_of`).

    Returns ``tokens`` (padded with `pad_id`) and ``labels`` (padded with -100), both
    ``[b, s]`` int64; ``input_pos`` and ``doc_ids`` when the items have them (padding is its
    own document: doc id -1, positions from 0); and two ints for loss normalisation:
    ``num_tokens``, the real (non-padding) tokens, and ``num_targets``, the labels != -100;
    unpacked batches also carry ``seq_lens``, the real length of each row.
    Padding is told apart by position, never by comparing with `pad_id`, which tokenizers often
    share with eos.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    extra = [key for key in _OPTIONAL_KEYS if key in batch[0]]
    if any(sorted(k for k in _OPTIONAL_KEYS if k in item) != sorted(extra) for item in batch):
        raise ValueError(f"batch mixes packed and unpacked items (keys {_OPTIONAL_KEYS})")

    lengths = [len(item["tokens"]) for item in batch]
    seq_len = max(lengths)
    if pad_to_multiple_of:
        seq_len = -(-seq_len // pad_to_multiple_of) * pad_to_multiple_of

    pad_values = {"tokens": pad_id, "labels": IGNORE_INDEX, "doc_ids": PAD_DOC_ID}
    out: dict[str, Any] = {}
    for key in ("tokens", "labels", *extra):
        stacked = torch.full((len(batch), seq_len), pad_values.get(key, 0), dtype=torch.long)
        for row, item in enumerate(batch):
            stacked[row, : lengths[row]] = torch.as_tensor(item[key], dtype=torch.long)
            if key == "input_pos":
                stacked[row, lengths[row] :] = torch.arange(seq_len - lengths[row])
        out[key] = stacked  # [b, s]

    if "doc_ids" in out:  # packed rows carry their own padding, marked by doc id
        out["num_tokens"] = int((out["doc_ids"] != PAD_DOC_ID).sum())
    else:
        out["num_tokens"] = sum(lengths)
        out["seq_lens"] = lengths  # per row: padding-free training drops what lies past it
    out["num_targets"] = int((out["labels"] != IGNORE_INDEX).sum())
    return out
