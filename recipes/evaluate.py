"""Evaluate a model (optionally with a LoRA adapter) on held-out rows: loss and answer accuracy.

    tune run evaluate --config llama/tiny_evaluate
    tune run evaluate --config MY_EVAL.yaml adapter=out/run/adapter

Two measurements, written atomically to `<output_dir>/eval.json`:

- held-out loss: the mean cross-entropy over the target tokens of `dataset`, computed by the
  trainer's own loss (`causal_lm_loss`) on the same tokenized items, so it is the number the
  training loop's `val_loss` would report for this data;
- exact-answer accuracy, for rows that carry an answer (`answer_column`): the prompt (the row's
  conversation up to its last assistant turn, in the tokenizer's chat format) is answered by
  greedy generation and the reply scored: by reasoning-gym's scorer of `task` when it is set
  (a reply scoring 1.0 is correct), else by exact match after normalisation (case, spacing,
  a trailing period). Replies go to `<output_dir>/predictions.jsonl`.

The rows for generation are read from the `dataset` node's own keys (`source`, `data_files`,
`split`, `format`, `column_map`, `system_prompt`: those of `tunewright.data.sft_dataset`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tunewright.training.entry import recipe_main
from tunewright.training.schema import PositiveInt
from tunewright.training.train_config import RunConfig


@dataclass(kw_only=True)
class Config(RunConfig):
    adapter: str | None = None  # a PEFT adapter directory put on the model (and merged)
    batch_size: PositiveInt = 8

    answer_column: str | None = "answer"  # null: loss only
    task: str | None = None  # a reasoning-gym task name: score replies with its scorer
    max_new_tokens: PositiveInt = 32
    max_answers: PositiveInt | None = None  # score only the first N rows that carry an answer
    generate_batch_size: PositiveInt = 64  # prompts decoded together (equal lengths batch best)
    # torch.compile each block for the held-out loss; replies are generated eagerly (each group
    # of equal-length prompts has its own KV-cache size, which would recompile per group).
    compile: bool = False


def normalize(text: str) -> str:
    """Case-folded, single-spaced, without surrounding space or a final period."""
    return re.sub(r"\s+", " ", text).strip().removesuffix(".").strip().casefold()


def exact_match(reply: str, row: Mapping[str, Any], *, answer_column: str = "answer") -> float:
    return float(normalize(reply) == normalize(str(row[answer_column])))


def make_scorer(task: str | None, answer_column: str) -> tuple[Callable[[str, Mapping], float], str]:
    """(reply, row) -> score in [0, 1], and the scorer's name."""
    if task is None:
        return lambda reply, row: exact_match(reply, row, answer_column=answer_column), "exact match"
    from tunewright.data.reasoning_gym import score_fn

    score = score_fn(task)
    if answer_column == "answer":
        return score, f"reasoning-gym {task}"
    return lambda reply, row: score(reply, {**row, "answer": row[answer_column]}), f"reasoning-gym {task}"


def prompts_and_rows(cfg: Config, tokenizer: Any) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Chat-formatted prompt ids of the rows of `cfg.dataset` that carry an answer, with the rows
    (plus `_question`: the prompt's last message)."""
    from tunewright.data.formats import make_converter
    from tunewright.data.sources import load_rows

    node = cfg.dataset
    if "source" not in node:
        raise ValueError(f"dataset: answer accuracy reads the rows from dataset.source, which "
                         f"{node['_component_']} does not have (set answer_column: null)")
    convert = make_converter(node.get("format", "instruct"), column_map=node.get("column_map"),
                             system_prompt=node.get("system_prompt"))
    rows = load_rows(node["source"], data_files=node.get("data_files"), split=node.get("split", "train"))
    if cfg.answer_column not in rows.column_names:
        raise ValueError(f"answer_column: the dataset has no column '{cfg.answer_column}' "
                         f"(columns: {', '.join(rows.column_names)}); set answer_column: null for loss only")
    prompts, kept = [], []
    for row in rows:
        if row[cfg.answer_column] is None:
            continue
        if cfg.max_answers is not None and len(kept) == cfg.max_answers:
            break
        messages = convert(row)
        if isinstance(messages, str):
            raise ValueError("format 'text' rows have no prompt to answer; set answer_column: null")
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference reply
        ids, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
        prompts.append(ids)
        kept.append({**row, "_question": messages[-1]["content"]})
    return prompts, kept


def main(cfg: Config) -> dict[str, Any]:
    import functools
    import json
    import time
    from pathlib import Path

    import torch

    from tunewright.models.pretrained import as_dtype
    from tunewright.training.atomic import atomic_write_text
    from tunewright.training.data_setup import make_batches
    from tunewright.training.generation import generate, merge_adapter
    from tunewright.training.instantiate import instantiate
    from tunewright.training.setup import seed_everything, setup_device
    from tunewright.training.objectives import causal_lm_loss, evaluate_loss
    from tunewright.training.transforms import compile_blocks

    # ------------------------------------------------------------------ set-up
    for key in ("batch_size", "generate_batch_size", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    start = time.perf_counter()
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer, scorer_name = make_scorer(cfg.task, cfg.answer_column or "answer")

    # ------------------------------------------------------------------ model (+ adapter)
    model = instantiate(cfg.model, dtype=as_dtype(cfg.dtype), device=device)
    if cfg.adapter is not None:
        merge_adapter(model, cfg.adapter)  # folded into the weights: generation at base speed
    model.eval()
    if cfg.compile:
        compile_blocks(model)
    tokenizer = instantiate(cfg.tokenizer)

    # ------------------------------------------------------------------ held-out loss
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = make_batches(dataset, pad_id=tokenizer.pad_id, batch_size=cfg.batch_size, shuffle=False,
                           padding_free=not cfg.compile)  # flattened on the host, as collated
    # Compiled blocks get padded [b, s] batches: one graph with a dynamic length, where the
    # padding-free layout (a new list of row lengths per batch) recompiles batch after batch.
    loss_fn = functools.partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size,
                                padding_free=not cfg.compile)
    print(f"held-out loss over {len(dataset)} rows", flush=True)
    held_out = evaluate_loss(model, batches, loss_fn, device=device)
    num_targets = int(held_out.num_targets)
    result: dict[str, Any] = {
        "loss": float(held_out.loss), "num_targets": num_targets, "num_rows": len(dataset),
        "model": cfg.model.get("path"), "adapter": cfg.adapter, "dataset": cfg.dataset.get("source"),
        "split": cfg.dataset.get("split"),
    }

    # ------------------------------------------------------------------ answers
    predictions = []
    if cfg.answer_column is not None:
        prompts, rows = prompts_and_rows(cfg, tokenizer)
        print(f"greedy replies to {len(prompts)} prompts (at most {cfg.max_new_tokens} tokens each)",
              flush=True)
        # Sorted by length, so that each call gets few distinct lengths (`generate` batches
        # prompts of one length together).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[list[int]] = [[] for _ in prompts]
        for begin in range(0, len(order), cfg.generate_batch_size):
            chunk = order[begin:begin + cfg.generate_batch_size]
            with torch.compiler.set_stance("force_eager"):  # see `compile` in Config
                new = generate(model, [prompts[i] for i in chunk], max_new_tokens=cfg.max_new_tokens,
                               stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                               vocab_size=tokenizer.vocab_size)
            for i, ids in zip(chunk, new):
                replies[i] = ids
        for row, ids in zip(rows, replies):
            kept_ids = [i for i in ids if i not in tokenizer.stop_ids]
            reply = tokenizer.decode(kept_ids, skip_special=True).strip()
            predictions.append({"question": row["_question"], "answer": str(row[cfg.answer_column]),
                                "reply": reply, "score": scorer(reply, row)})
        num_correct = sum(p["score"] >= 1.0 for p in predictions)
        result.update(accuracy=num_correct / len(predictions) if predictions else None,
                      num_correct=num_correct, num_scored=len(predictions), scorer=scorer_name)
    result["time_s"] = round(time.perf_counter() - start, 1)

    # ------------------------------------------------------------------ report
    if predictions:
        atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    line = (f"eval: held-out loss {result['loss']:.4f} over {num_targets:,} target tokens "
            f"({len(dataset)} rows)")
    if result.get("accuracy") is not None:
        line += (f"; accuracy {result['accuracy']:.1%} ({result['num_correct']}/{result['num_scored']}, "
                 f"{scorer_name})")
    print(f"{line}; wrote {out / 'eval.json'}", flush=True)
    return result


if __name__ == "__main__":
    recipe_main(__file__)
