"""Prompts for online RL: rows rendered with the chat template and its generation prompt, with
every other column kept for the reward functions (`training/rewards.py`).

    prompts = prompt_dataset(tokenizer, source="data/tasks.jsonl")              # a `prompt` column
    prompts = prompt_dataset(tokenizer, source="tiny.jsonl", format="instruct")  # SFT data: reply dropped
    prompts = reasoning_gym_prompts(tokenizer, task="basic_arithmetic", size=1000, seed=0)
    prompts[0]  # {"prompt_ids": [...], "prompt": <as given>, "answer": "7", ...}

Formats: `prompt` (TRL's prompt-only form: a `prompt` column holding a string or a list of
messages), or any SFT format (`instruct`, `chat`: `data/formats.py`), whose trailing assistant
turn, the reference reply, is dropped (its columns stay, e.g. Alpaca's `output`). Sources are
those of SFT data (`data/sources.py`). reasoning-gym tasks are generated on the fly from a seed
(`data/reasoning_gym.py`), with their `answer`, `task` and `metadata` columns, and optionally
`num_few_shot` solved examples of the same task as earlier turns.

A prompt longer than `max_prompt_len` (default: the tokenizer's max_seq_len) is an error naming
its row: cutting it would change the question.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping

import torch

from tunewright.data.formats import DataError, chat_messages, check_columns, make_converter
from tunewright.data.tokenizer.base import TokenCount, Tokenizer


class PromptDataset(torch.utils.data.Dataset):
    """Tokenized prompts (`prompt_ids`) with their rows' other fields; batches are lists of
    items (`collate`), since the rollout takes token lists of any length."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], tokenizer: Tokenizer, *, to_messages: Any,
                 source: str, max_prompt_len: int | None = None, chat_template: bool = True) -> None:
        from tunewright.data.sft import plain_ids

        limit = max_prompt_len if max_prompt_len is not None else getattr(tokenizer, "max_seq_len", None)
        self.source = source
        self.items: list[dict[str, Any]] = []
        for index, row in enumerate(rows):
            try:
                messages = to_messages(row)
            except DataError as e:
                raise DataError(f"{source} row {index}: {e}") from None
            while messages and messages[-1]["role"] == "assistant":  # the reference reply
                messages = messages[:-1]
            if not messages:
                raise DataError(f"{source} row {index}: no prompt left once the assistant reply is dropped")
            if chat_template:
                ids, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
            else:
                ids, _ = plain_ids(tokenizer, messages)
            if limit is not None and len(ids) > limit:
                raise DataError(f"{source} row {index}: the prompt has {len(ids)} tokens, more than "
                                f"max_prompt_len={limit}; shorten it, drop the row, or raise max_prompt_len")
            fields = {k: v for k, v in row.items() if k not in ("prompt_ids", "completion_ids")}
            self.items.append({**fields, "prompt": row.get("prompt", messages), "prompt_ids": ids})
        if not self.items:
            raise DataError(f"{source}: no rows")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["prompt_ids"]) for item in self.items]

    @property
    def max_token_id(self) -> int:
        return max(max(item["prompt_ids"]) for item in self.items)

    @staticmethod
    def collate(items: list[dict[str, Any]], **_: Any) -> list[dict[str, Any]]:
        return list(items)


def _prompt_messages(column: str, system_prompt: str | None) -> Any:
    def convert(row: Mapping[str, Any]) -> list:
        value = row.get(column)
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
            return messages if system_prompt is None else [{"role": "system", "content": system_prompt}, *messages]
        if isinstance(value, list):
            return chat_messages({"messages": value}, system_prompt=system_prompt)
        raise DataError(f"field '{column}' must be a string or a list of messages, got {type(value).__name__}")

    return convert


def prompt_dataset(
    tokenizer: Tokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    format: Literal["prompt", "instruct", "chat"] = "prompt",
    column_map: dict[str, str] | None = None,
    system_prompt: str | None = None,
    max_prompt_len: TokenCount | None = None,
    chat_template: bool = True,
) -> PromptDataset:
    """The prompts a config names (see the module docstring); `column_map` renames the
    `prompt` column (format prompt) or the SFT format's columns."""
    from tunewright.data.sources import load_rows

    if format == "prompt":
        unknown = sorted(set(column_map or {}) - {"prompt"})
        if unknown:
            raise ValueError(f"column_map keys {unknown} do not apply to format 'prompt'; expected 'prompt'")
        column = (column_map or {}).get("prompt", "prompt")
        convert = _prompt_messages(column, system_prompt)
    else:
        convert = make_converter(format, column_map=column_map, system_prompt=system_prompt)
    rows = load_rows(source, data_files=data_files, split=split)
    described = source if split == "train" else f"{source} (split {split!r})"
    if format == "prompt" and column not in rows.column_names:
        raise DataError(f"{described}: format 'prompt' needs a column '{column}'; the columns are "
                        f"{', '.join(rows.column_names) or 'none'} (map yours with dataset.column_map)")
    if format != "prompt":
        check_columns(format, rows.column_names, column_map=column_map, source=described)
    return PromptDataset(rows, tokenizer, to_messages=convert, source=described, max_prompt_len=max_prompt_len,
                         chat_template=chat_template)


def reasoning_gym_prompts(
    tokenizer: Tokenizer,
    *,
    task: str,
    size: int,
    seed: int = 0,
    task_config: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    num_few_shot: int = 0,
    max_prompt_len: TokenCount | None = None,
) -> PromptDataset:
    """`size` prompts of a reasoning-gym task generated from `seed` (the same every time), each
    after `num_few_shot` solved examples of the task drawn from a far-away seed."""
    from tunewright.data.reasoning_gym import TRAIN_SEED_OFFSET, _items, to_row

    if size < 1 or num_few_shot < 0:
        raise ValueError(f"reasoning_gym_prompts: size ({size}) must be >= 1 and num_few_shot ({num_few_shot}) >= 0")
    config = dict(task_config or {})
    shots: list[dict[str, str]] = []
    for item in _items(task, seed=seed + 2 * TRAIN_SEED_OFFSET, size=num_few_shot, task_config=config):
        shots += [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": str(item["answer"])}]
    rows = []
    for item in _items(task, seed=seed, size=size, task_config=config):
        row = to_row(item, task, system_prompt=system_prompt)
        head = row["messages"][:-2]  # the system prompt, if any
        row["messages"] = [*head, *shots, *row["messages"][-2:]]
        row["question"] = item["question"]
        rows.append(row)
    return PromptDataset(rows, tokenizer, to_messages=lambda row: chat_messages(row), source=f"reasoning-gym {task}",
                         max_prompt_len=max_prompt_len)
