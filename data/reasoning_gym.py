"""Verifiable SFT data from reasoning-gym: a seeded task written as train / held-out JSONL.

    from tunewright.data.reasoning_gym import write_splits
    files = write_splits("basic_arithmetic", "data/", num_train=1000, num_eval=100,
                         task_config={"max_terms": 2}, system_prompt="Reply with the number only.")
    # files["train"], files["eval"]: chat rows for `sft_dataset(format="chat")`

reasoning-gym (https://github.com/open-thought/reasoning-gym) generates task items procedurally
from a seed, each with a `question`, an `answer` and a scorer that checks a reply. Every row
written here is a one-turn chat, plus the fields the evaluate recipe scores with:

    {"messages": [{"role": "system", ...}?, {"role": "user", "content": question},
                  {"role": "assistant", "content": answer}],
     "answer": answer, "task": name, "metadata": "<the item's metadata as JSON>"}

Held-out rows never occur in train: an item with the same question as a held-out item is
dropped from train. That check matters because reasoning-gym seeds item `i` of a dataset
with `seed + i`, so two datasets with nearby seeds share items, and small tasks repeat
questions; train is drawn from a far-away seed and topped up until it has `num_train` rows.
The same arguments always give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

# Train items are drawn from `seed + TRAIN_SEED_OFFSET + i`, far from the held-out ones.
TRAIN_SEED_OFFSET = 1_000_003


def _items(task: str, *, seed: int, size: int, task_config: Mapping[str, Any]) -> Iterator[dict]:
    import reasoning_gym  # lazy: imports sympy and friends

    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **dict(task_config))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"reasoning-gym task {task!r} with {dict(task_config)}: {e}") from None
    yield from dataset


def to_row(item: Mapping[str, Any], task: str, *, system_prompt: str | None = None) -> dict[str, Any]:
    """One reasoning-gym item as a chat row that keeps its answer and metadata for scoring."""
    messages = [{"role": "user", "content": item["question"]},
                {"role": "assistant", "content": str(item["answer"])}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    # metadata holds tuples and nested dicts whose shape differs between items; as a JSON
    # string it is one column type that every loader reads back unchanged.
    metadata = json.dumps(item.get("metadata", {}), sort_keys=True, default=str)
    return {"messages": messages, "answer": str(item["answer"]), "task": task, "metadata": metadata}


def make_splits(
    task: str,
    *,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    task_config: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "eval": rows}: disjoint by question, deterministic in the arguments."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    config = dict(task_config or {})
    seen: set[str] = set()

    def draw(split: str, split_seed: int, num_rows: int) -> list[dict[str, Any]]:
        # Repeated questions are dropped (a held-out one would count twice; a train one would
        # leak), so draw more than asked; a task with too few distinct questions fails
        # instead of looping forever. Items are generated lazily: the budget costs nothing.
        rows: list[dict[str, Any]] = []
        for item in _items(task, seed=split_seed, size=4 * num_rows + 64, task_config=config):
            if len(rows) == num_rows:
                break
            if item["question"] not in seen:
                seen.add(item["question"])
                rows.append(to_row(item, task, system_prompt=system_prompt))
        if len(rows) < num_rows:
            raise ValueError(f"reasoning-gym task {task!r} gave only {len(rows)} distinct {split} "
                             f"questions (asked for {num_rows}); widen the task config or ask "
                             "for fewer rows")
        return rows

    held_out = draw("held-out", seed, num_eval)  # first, so that train avoids its questions
    return {"train": draw("train", seed + TRAIN_SEED_OFFSET, num_train), "eval": held_out}


def write_splits(
    task: str,
    out_dir: str | Path,
    *,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    task_config: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
) -> dict[str, Path]:
    """Write `train.jsonl` and `eval.jsonl` (see `make_splits`) into `out_dir`; returns their
    paths. Each file is written under a temporary name and renamed into place."""
    from tunewright.training.atomic import atomic_write_text

    splits = make_splits(task, num_train=num_train, num_eval=num_eval, seed=seed,
                         task_config=task_config, system_prompt=system_prompt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def score_fn(task: str):
    """reasoning-gym's scorer of `task`: (reply, row) -> score in [0, 1]; 1 is a correct answer.

    `row` is a row written by `to_row` (its `answer` and JSON `metadata`) or a reasoning-gym
    item; scorers of some tasks read the metadata.
    """
    import reasoning_gym

    try:
        score = reasoning_gym.get_score_answer_fn(task)
    except ValueError as e:
        raise ValueError(f"unknown reasoning-gym task {task!r}: {e}") from None

    def scorer(reply: str, row: Mapping[str, Any]) -> float:
        metadata = row.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        entry = {"question": row.get("question", ""), "answer": row["answer"], "metadata": metadata}
        return float(score(reply, entry))

    return scorer
