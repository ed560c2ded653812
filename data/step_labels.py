"""Step-labelled reasoning for process reward models (PRMs): TRL's `PRMTrainer` data form
(Math-Shepherd, PRM800K converted):

    {"prompt": "What is 4 - 1 - 7?", "completions": ["4 - 1 = 3", "3 - 7 = -4"], "labels": [true, true]}

Each row becomes TRL's token layout: [bos] + prompt + for each step: step + separator, every
id plain text (no chat template), and the step's label (1 correct, 0 not) on the last id of
its separator; every other position is ignored (-100), so the loss and the metrics see only the
separators. `max_seq_len` cuts the end (TRL's `max_length`), and with it the labels of the steps
it cuts; a row left with no labelled step is dropped and counted.

`arithmetic_step_rows` writes such rows from reasoning-gym's arithmetic chains (`chain_sum`), a
corrupted copy next to each correct one, for a PRM that learns to tell a wrong step.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from tunewright.data.formats import DataError
from tunewright.data.tokenizer.base import IGNORE_INDEX, Tokenizer

COLUMNS = ("prompt", "completions", "labels")


def encode_steps(tokenizer: Tokenizer, prompt: str, steps: Sequence[str], labels: Sequence[bool] | None,
                 *, separator_ids: Sequence[int], max_seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of one row in TRL's layout (module docstring); `labels` None marks every
    separator with 1 (scoring: the positions matter, not the values)."""
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    targets = [IGNORE_INDEX] * len(ids)
    for i, step in enumerate(steps):
        step_ids = tokenizer.encode(step) + list(separator_ids)
        ids += step_ids
        targets += [IGNORE_INDEX] * (len(step_ids) - 1) + [1 if labels is None else int(labels[i])]
    if max_seq_len is not None:
        ids, targets = ids[:max_seq_len], targets[:max_seq_len]
    return ids, targets


def _row_fields(row: Mapping[str, Any], columns: Mapping[str, str], where: str) -> tuple[str, list[str], list[bool]]:
    names = {c: columns.get(c, c) for c in COLUMNS}
    missing = [names[c] for c in COLUMNS if row.get(names[c]) is None]
    if missing:
        raise DataError(f"{where}: no {', '.join(missing)}; a process reward model trains on rows of "
                        f"prompt, completions (the steps) and labels (one true/false per step)")
    prompt, steps, labels = row[names["prompt"]], row[names["completions"]], row[names["labels"]]
    if not isinstance(prompt, str) or not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: {names['prompt']} must be text and {names['completions']} a list of texts")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, (bool, np.bool_)) for v in labels):
        raise DataError(f"{where}: {names['labels']} must be a list of true/false, one per step, got {labels!r}")
    if len(labels) != len(steps) or not steps:
        raise DataError(f"{where}: {len(steps)} steps in {names['completions']} but {len(labels)} labels; "
                        "give one label per step")
    return prompt, list(steps), [bool(v) for v in labels]


class StepLabelDataset(torch.utils.data.Dataset):
    """Tokenized step-labelled rows (`rows`: a `datasets.Dataset` or any iterable of dicts);
    items are plain rows ({"tokens", "labels"}) that `collate_flat`/`collate_padded` batch."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], tokenizer: Tokenizer, *, step_separator: str = "\n",
                 max_seq_len: int | None = None, column_map: Mapping[str, str] | None = None,
                 source: str = "dataset") -> None:
        unknown = set(column_map or {}) - set(COLUMNS)
        if unknown:
            raise ValueError(f"column_map: unknown field(s) {sorted(unknown)}; map {', '.join(COLUMNS)}")
        separator_ids = tokenizer.encode(step_separator)
        if not separator_ids:
            raise ValueError(f"step_separator {step_separator!r} encodes to no tokens")
        limits = [n for n in (max_seq_len, getattr(tokenizer, "max_seq_len", None)) if n is not None]
        self.source, self.num_rows_read, self.num_cut = source, 0, 0
        self._items: list[tuple[np.ndarray, np.ndarray]] = []
        for index, row in enumerate(rows):
            self.num_rows_read += 1
            prompt, steps, labels = _row_fields(row, column_map or {}, f"{source} row {index}")
            ids, targets = encode_steps(tokenizer, prompt, steps, labels, separator_ids=separator_ids,
                                        max_seq_len=min(limits) if limits else None)
            if all(t == IGNORE_INDEX for t in targets):
                self.num_cut += 1
                continue
            self._items.append((np.asarray(ids, dtype=np.int32), np.asarray(targets, dtype=np.int64)))
        if not self._items:
            raise DataError(f"{source}: no rows with a labelled step left" + (
                f" ({self.num_cut} cut before their first step by max_seq_len)" if self.num_cut else ""))

    def dropped_warning(self) -> str | None:
        if not self.num_cut:
            return None
        return (f"warning: {self.source}: dropped {self.num_cut} of {self.num_rows_read} rows "
                "(no step ends within max_seq_len)")

    @property
    def max_token_id(self) -> int:
        return max(int(ids.max()) for ids, _ in self._items)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for ids, targets in self._items:
            digest.update(ids.tobytes())
            digest.update(targets.tobytes())
        return digest.hexdigest()

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids, targets = self._items[index]
        return {"tokens": ids.astype(np.int64).tolist(), "labels": targets.tolist()}


def step_label_dataset(
    tokenizer: Tokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    step_separator: str = "\n",
    max_seq_len: int | None = None,
    column_map: dict[str, str] | None = None,
) -> StepLabelDataset:
    """The step-labelled rows a config names (`source`, `data_files`, `split` as `load_rows`);
    `step_separator` is TRL's (default "\\n")."""
    from tunewright.data.sft import _describe
    from tunewright.data.sources import load_rows

    rows = load_rows(source, data_files=data_files, split=split)
    return StepLabelDataset(rows, tokenizer, step_separator=step_separator, max_seq_len=max_seq_len,
                            column_map=column_map, source=_describe(source, data_files, split))


# ---------------------------------------------------------------- arithmetic steps
_TERM = re.compile(r"([+-])\s*(-?\d+)")


def chain_steps(expression: str, rng: random.Random, *, corrupt: bool) -> tuple[list[str], list[bool]]:
    """The left-to-right steps of `a op b op c ...` ("4 - 1 = 3", "3 - 7 = -4"). `corrupt`: one
    step's result is off by 10 to 30, the step labelled false; the steps after it carry its
    value on with right arithmetic (each step is judged on its own, as PRM800K rates them). A
    slip that size is one a small model learns to see in a CPU-minute (off by 1 to 9 it needs
    the whole addition table first: far longer)."""
    first, rest = expression.split(maxsplit=1)
    terms = _TERM.findall(rest)
    value, steps, labels = int(first), [], []
    bad = rng.randrange(len(terms)) if corrupt else -1
    for i, (op, term) in enumerate(terms):
        result = value + int(term) if op == "+" else value - int(term)
        if i == bad:
            result += rng.choice([-1, 1]) * rng.randint(10, 30)
        steps.append(f"{value} {op} {term} = {result}")
        labels.append(i != bad)
        value = result
    return steps, labels


def arithmetic_step_rows(rows: Iterable[Mapping[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """Step-labelled rows from reasoning-gym arithmetic rows (`data/reasoning_gym.py`'s, whose
    metadata holds the `expression`): each gives a correct solution and a corrupted one, after
    the prompt "<expression> = ?"."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        expression = json.loads(row["metadata"])["expression"]
        prompt = f"{expression} = ?\n"  # the question's own wording adds only tokens to read past
        for corrupt in (False, True):
            steps, labels = chain_steps(expression, rng, corrupt=corrupt)
            out.append({"prompt": prompt, "completions": steps, "labels": labels})
    return out


def write_arithmetic_steps(out_dir: str | Path, *, num_train: int, num_eval: int, seed: int = 0,
                           task_config: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """train.jsonl / eval.jsonl of `arithmetic_step_rows` from reasoning-gym's `chain_sum`
    (held-out questions never in train, as `make_splits`); 2 rows per question."""
    from tunewright.data.reasoning_gym import make_splits
    from tunewright.training.atomic import atomic_write_text

    config = {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 1, **dict(task_config or {})}
    splits = make_splits("chain_sum", num_train=num_train, num_eval=num_eval, seed=seed, task_config=config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in splits.items():
        files[name] = out / f"{name}.jsonl"
        lines = "".join(json.dumps(r) + "\n" for r in arithmetic_step_rows(rows, seed=seed))
        atomic_write_text(files[name], lines)
    return files
