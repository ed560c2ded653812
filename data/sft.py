"""Supervised fine-tuning dataset: rows -> token ids and already-shifted labels.

Each item is ``{"tokens": list[int], "labels": list[int]}`` of equal length, where
``labels[i]`` is the target predicted at position ``i``: ``tokens[i + 1]`` when that token is
trained on (an assistant token, or any token with ``train_on_input``), else ``IGNORE_INDEX``
(-100). The last position has no next token, so its label is always -100.

Shifting here rather than in the loss has two consequences that the rest of the code relies on:
- the loss is a plain ``cross_entropy(logits.flatten(0, 1), labels.flatten())``, no shift;
- packing concatenates documents as they are: a document's last label is -100, so no position
  is ever asked to predict the first token of the next document.

Truncation to `max_seq_len` cuts the tokens and then derives the labels, so a truncated item
also ends with -100 (the same rule `PackedDataset` applies). A row left without any target (its
reply cut off) would only add padding to a batch: it is dropped and counted
(`dropped_warning`), and a dataset with no target at all is a `DataError` saying why.

Rows are tokenized eagerly, once, into flat arrays: item lengths are then known up front for
packing and length-grouped sampling, and memory stays at ~5 bytes per token instead of Python
lists of ints.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sized

import numpy as np
import torch

from tunewright.data.formats import Converter, DataError, Format, check_columns, make_converter
from tunewright.data.packing import PackedDataset  # at run time: the config schema reads annotations
from tunewright.data.sources import load_rows
from tunewright.data.tokenizer.base import IGNORE_INDEX, TokenCount, Tokenizer
from tunewright.data.tokenizer.chat import ChatTemplateError


def plain_ids(tokenizer: Tokenizer, messages: list) -> tuple[list[int], list[bool]]:
    """Messages without a chat template, as torchtune's instruct datasets (Alpaca on a base
    model): bos, the prompt text, each response then eos; responses are trained on.

    Each text after the first is encoded as a continuation (`"\n" + text` minus the ids of
    `"\n"`), so SentencePiece adds no word-start space in front of it.
    """
    newline = tokenizer.encode("\n")
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        text = message["content"].rstrip(" ")
        piece = tokenizer.encode(text) if not ids or i == 0 else tokenizer.encode("\n" + text)[len(newline):]
        is_response = message["role"] == "assistant"
        if is_response:
            piece = piece + [tokenizer.eos_id]
        ids += piece
        trained += [is_response] * len(piece)
    return ids, trained


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized SFT samples from `rows` (a `datasets.Dataset` or any iterable of dicts).

    `source` only names the rows in error messages (``alpaca.json row 12: missing field
    'output'``). See `tunewright.data.formats` for `format`, `column_map` and `system_prompt`.
    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        format: Format = "instruct",
        column_map: Mapping[str, str] | None = None,
        max_seq_len: int | None = None,
        train_on_input: bool = False,
        system_prompt: str | None = None,
        source: str = "dataset",
        chat_template: bool = True,
    ) -> None:
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        convert = make_converter(format, column_map=column_map, system_prompt=system_prompt)
        self.max_seq_len = max_seq_len
        self.source = source
        # The tokenizer may cut chat turns itself (its own max_seq_len): either limit can leave
        # a row without its reply.
        limits = [n for n in (max_seq_len, getattr(tokenizer, "max_seq_len", None)) if n is not None]
        limit = self._limit = min(limits) if limits else None

        from tqdm.auto import tqdm  # lazy; disable=None hides the bar when not on a terminal

        chunks_tokens: list[np.ndarray] = []
        chunks_trained: list[np.ndarray] = []
        lengths: list[int] = []
        self.num_rows_read = self.num_dropped = self.num_cut = 0
        total = len(rows) if isinstance(rows, Sized) else None
        index = -1
        try:
            for index, row in enumerate(tqdm(rows, total=total, desc="tokenizing", disable=None)):
                ids, trained = self._tokenize(row, index, tokenizer, convert, chat_template, train_on_input)
                if max_seq_len is not None and len(ids) > max_seq_len:
                    ids, trained = ids[:max_seq_len], trained[:max_seq_len]
                    if not chat_template:  # torchtune's rule for its plain instruct datasets
                        ids[-1] = tokenizer.eos_id
                self.num_rows_read += 1
                if not any(trained[1:]):  # labels[i] is trained[i + 1]: no target at all
                    self.num_dropped += 1
                    self.num_cut += limit is not None and len(ids) >= limit
                    continue
                chunks_tokens.append(np.asarray(ids, dtype=np.int64))
                chunks_trained.append(np.asarray(trained, dtype=np.bool_))
                lengths.append(len(ids))
        except UnicodeDecodeError:  # a parquet/arrow/Hub column holding bytes that are not UTF-8
            raise DataError(f"{source} row {index + 1}: text that is not valid UTF-8") from None
        if not lengths:
            raise DataError(self._nothing_to_train())

        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
        # int32 halves memory; every real vocabulary fits.
        self._tokens = np.concatenate([np.zeros(0, np.int32), *chunks_tokens]).astype(np.int32)
        self._trained = np.concatenate([np.zeros(0, np.bool_), *chunks_trained])

    def _tokenize(self, row: Mapping[str, Any], index: int, tokenizer: Tokenizer, convert: Converter,
                  chat_template: bool, train_on_input: bool) -> tuple[list[int], list[bool]]:
        """Ids and trained-mask of one row; a bad row or a template that fails on it is a
        `DataError` naming the source and the row."""
        try:
            converted = convert(row)
            if isinstance(converted, str):  # plain text: the whole document is the target
                ids = tokenizer.encode(converted, add_bos=True, add_eos=True)
                trained = [True] * len(ids)
            elif chat_template:
                ids, trained = tokenizer.tokenize_messages(converted)
            else:
                ids, trained = plain_ids(tokenizer, converted)
        except (DataError, ChatTemplateError) as e:
            raise DataError(f"{self.source} row {index}: {e}") from None
        if train_on_input:
            trained = [True] * len(ids)
        assert len(ids) == len(trained), "tokenizer returned ids and mask of different length"
        return ids, trained

    def _nothing_to_train(self) -> str:
        if self.num_rows_read == 0:
            return f"{self.source}: no rows"
        return (f"{self.source}: no row has a target token, nothing to train on "
                f"({self._drop_reasons()}); raise max_seq_len or shorten the prompts")

    def dropped_warning(self) -> str | None:
        """One line counting the rows dropped for lack of a target token, or None."""
        if not self.num_dropped:
            return None
        return (f"warning: {self.source}: dropped {self.num_dropped} of {self.num_rows_read} rows that "
                f"have no target token ({self._drop_reasons()})")

    def _drop_reasons(self) -> str:
        reasons = [f"{self.num_cut} cut off at max_seq_len={self._limit} before their reply"] if self.num_cut else []
        if self.num_cut < self.num_dropped:
            reasons.append(f"{self.num_dropped - self.num_cut} with nothing to train on (an empty reply?)")
        return ", ".join(reasons)

    @property
    def max_token_id(self) -> int:
        """The largest token id in the data (-1 if none), to check against the model's vocabulary."""
        return int(self._tokens.max()) if len(self._tokens) else -1

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> list[int]:
        """Token count of every item, for packing and length-grouped sampling."""
        return self._lengths.tolist()

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        tokens = self._tokens[start:end].astype(np.int64)
        trained = self._trained[start:end]
        labels = np.full_like(tokens, IGNORE_INDEX)
        labels[:-1] = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}


def sft_dataset(
    tokenizer: Tokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    format: Format = "instruct",
    column_map: dict[str, str] | None = None,
    max_seq_len: TokenCount | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> SFTDataset | PackedDataset:
    """The SFT dataset a config names, e.g.

    .. code-block:: yaml

        dataset:
          _component_: tunewright.data.sft_dataset
          source: data/alpaca.json
          split: train[:95%]
          format: instruct
          max_seq_len: 2048
          packed: true

    `source`, `data_files` and `split` are those of `load_rows`; `packed` packs samples into
    rows of exactly `max_seq_len` tokens (see `PackedDataset`); `chat_template: false` uses the
    prompt text as is, without the tokenizer's chat format (see `plain_ids`).
    """
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs max_seq_len (the length of every packed row)")
    # Check format, column_map and system_prompt before the possibly long load.
    make_converter(format, column_map=column_map, system_prompt=system_prompt)
    rows = load_rows(source, data_files=data_files, split=split)
    described = _describe(source, data_files, split)
    if len(rows) == 0:
        raise DataError(f"{described}: no rows (an empty file or split)")
    # Before tokenizing: a whole column missing is a config problem, not row 0's.
    check_columns(format, rows.column_names, column_map=column_map, source=described)
    dataset = SFTDataset(
        rows,
        tokenizer,
        format=format,
        column_map=column_map,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        system_prompt=system_prompt,
        source=described,
        chat_template=chat_template,
    )
    if not packed:
        return dataset
    assert max_seq_len is not None
    return PackedDataset(dataset, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id)


def _describe(source: str, data_files: str | list[str] | None, split: str) -> str:
    # Row indices count within the split, so name a sliced split in error messages.
    name = source if data_files is None else f"{source}:{data_files}"
    return name if split == "train" else f"{name} (split {split!r})"
