"""Batching: a list of items into one batch, right-padded ``[b, s]`` or padding-free ``[1, T]``.

Use with a DataLoader as ``collate_fn=functools.partial(collate_padded, pad_id=tok.pad_id)``
(or `collate_flat`, which takes the same arguments).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tunewright.data.packing import PAD_DOC_ID
from tunewright.data.tokenizer.base import IGNORE_INDEX

_OPTIONAL_KEYS = ("input_pos", "doc_ids")  # present on packed items


def _packed_keys(batch: Sequence[dict[str, Any]]) -> list[str]:
    """The optional keys the items carry (the same for every item)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    extra = [key for key in _OPTIONAL_KEYS if key in batch[0]]
    if any(sorted(k for k in _OPTIONAL_KEYS if k in item) != sorted(extra) for item in batch):
        raise ValueError(f"batch mixes packed and unpacked items (keys {_OPTIONAL_KEYS})")
    return extra


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
    extra = _packed_keys(batch)
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")

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


def collate_flat(batch: Sequence[dict[str, Any]], *, pad_id: int | None = None, **_: Any) -> dict[str, Any]:
    """The items' real tokens laid end to end, the padding-free batch (`training/unpad.py`)
    made on the host: everything about its layout is known here, before the batch goes to a
    device, so the training step never reads a length back (a GPU -> host sync) or launches a
    kernel per sequence. Rows are concatenated in order and a packed row drops its padding
    (doc id -1), so the tokens are those of the padded batch with the padding taken out.

    Returns ``tokens``, ``labels``, ``input_pos`` (restarting at 0 for each sequence) and
    ``row_ids`` (each token's item in the batch), all ``[1, T]`` int64; ``seq_lens``, the
    length of each sequence (a row, or a document of a packed row; never 0), as python ints;
    and python ints ``num_rows``, ``num_tokens`` (= T) and ``num_targets``; ``target_index``
    [num_targets], the positions whose label counts, so the loss gathers them without a
    boolean mask (which on a GPU reads its count back). `pad_id` (and any option of
    `collate_padded`) is accepted and unused: nothing is padded.
    """
    extra = _packed_keys(batch)
    keys = ("tokens", "labels", *(["doc_ids"] if "doc_ids" in extra else []))
    flat = {key: torch.cat([torch.as_tensor(item[key], dtype=torch.long).reshape(-1) for item in batch])
            for key in keys}  # [T + padding]
    lengths = [len(item["tokens"]) for item in batch]
    if any(t.numel() != flat["tokens"].numel() for t in flat.values()):
        raise ValueError(f"collate: items whose {', '.join(keys[1:])} are not as long as their tokens")
    row_ids = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths, dtype=torch.long),
                                      output_size=sum(lengths))
    if "doc_ids" in flat:  # a packed row: its padding goes, its documents become sequences
        keep = flat["doc_ids"] != PAD_DOC_ID
        flat = {key: t[keep] for key, t in flat.items()}
        row_ids = row_ids[keep]
        seq_lens = sequence_lengths(row_ids, flat.pop("doc_ids"))
    else:
        seq_lens = [n for n in lengths if n > 0]
    out: dict[str, Any] = {key: t[None] for key, t in flat.items()}  # [1, T]
    out["input_pos"] = positions(seq_lens)[None]
    out["row_ids"] = row_ids[None]
    targets = (flat["labels"] != IGNORE_INDEX).nonzero().squeeze(1)
    out.update(seq_lens=seq_lens, num_rows=len(batch), num_tokens=sum(seq_lens),
               num_targets=targets.numel(), target_index=targets)
    return out


def sequence_lengths(row_ids: torch.Tensor, doc_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal (row, document) in the real tokens of packed rows, [T] each:
    a new sequence starts wherever either changes. Read on the host (a sync on a device)."""
    change = torch.ones_like(doc_ids, dtype=torch.bool)
    change[1:] = (doc_ids[1:] != doc_ids[:-1]) | (row_ids[1:] != row_ids[:-1])
    starts = change.nonzero().flatten().tolist() + [doc_ids.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


def positions(seq_lens: Sequence[int]) -> torch.Tensor:
    """RoPE positions of sequences of `seq_lens` laid end to end: 0, 1, ... restarting at each,
    int64 [T] on the host (one tensor, not one `arange` per sequence)."""
    lens = torch.tensor(list(seq_lens), dtype=torch.long)
    total = int(sum(seq_lens))
    starts = lens.cumsum(0) - lens
    return torch.arange(total) - torch.repeat_interleave(starts, lens, output_size=total)
