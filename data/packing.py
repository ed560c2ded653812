"""Packing: concatenate tokenized samples into rows of exactly `max_seq_len` tokens.

Short SFT samples padded to a batch's longest waste most of the compute; packed rows waste only
each row's tail. Each packed item carries, besides ``tokens`` and ``labels``:

- ``input_pos``: the position of each token within its own document (restarts at 0), so RoPE
  sees every document as if it were alone;
- ``doc_ids``: which document of the row each token belongs to (0, 1, ...; padding is -1), so
  the model can build a block-diagonal causal mask and no document attends to another.

Labels are already shifted (see `tunewright.data.sft`) and each document's last label is -100,
so concatenation never creates a target across a document boundary.

Packing is greedy and in order, and a sample is never split across rows: a sample that does not
fit in what is left of the current row starts the next one, and the current row's tail is
padded. Splitting would let a response continue in a row that has lost its prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from tunewright.data.tokenizer.base import IGNORE_INDEX

PAD_DOC_ID = -1  # doc id of padding tokens: a block of its own that no document attends to


class PackedDataset(torch.utils.data.Dataset):
    """Rows of exactly `max_seq_len` tokens packed from `dataset`'s ``{tokens, labels}`` items.

    Samples longer than `max_seq_len` are truncated first (their last label set to -100).
    `dataset` may expose ``lengths`` (as `SFTDataset` does) to avoid reading every item twice.
    """

    def __init__(
        self, dataset: Sequence[dict[str, Any]], *, max_seq_len: int, pad_id: int
    ) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = [len(dataset[i]["tokens"]) for i in range(len(dataset))]

        # bins[k] = the sample indices of packed row k, flattened with offsets.
        members: list[int] = []
        starts: list[int] = [0]
        used = 0
        for index, length in enumerate(lengths):
            length = min(length, max_seq_len)
            if length == 0:
                continue
            if used + length > max_seq_len:
                starts.append(len(members))
                used = 0
            members.append(index)
            used += length
        if members:
            starts.append(len(members))
        else:
            starts = [0]
        self._members = np.asarray(members, dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts) - 1

    @property
    def lengths(self) -> list[int]:
        return [self.max_seq_len] * len(self)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} packed rows")
        index %= len(self)
        tokens: list[int] = []
        labels: list[int] = []
        input_pos: list[int] = []
        doc_ids: list[int] = []
        members = self._members[self._starts[index] : self._starts[index + 1]]
        for doc, sample_index in enumerate(members.tolist()):
            sample = self.dataset[sample_index]
            sample_tokens = list(sample["tokens"][: self.max_seq_len])
            sample_labels = list(sample["labels"][: self.max_seq_len])
            # A truncated sample's last label would point past the cut, into the next document.
            sample_labels[-1] = IGNORE_INDEX
            tokens += sample_tokens
            labels += sample_labels
            input_pos += range(len(sample_tokens))
            doc_ids += [doc] * len(sample_tokens)
        num_pad = self.max_seq_len - len(tokens)
        assert num_pad >= 0, "packing overflowed a row"
        # Padding is one more "document": positions restart, labels are ignored.
        tokens += [self.pad_id] * num_pad
        labels += [IGNORE_INDEX] * num_pad
        input_pos += range(num_pad)
        doc_ids += [PAD_DOC_ID] * num_pad
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "doc_ids": doc_ids}
