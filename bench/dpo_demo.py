"""DPO demo, offline on the CPU: SmolLM2-135M-Instruct learns to prefer right answers.

    .venv/bin/python bench/dpo_demo.py [--work-dir out/dpo_demo]

1. model: SmolLM2-135M-Instruct from the GGUF file the quickstart uses (`tune quickstart`'s
   conversion, reused when `DIR/model` exists);
2. data: reasoning-gym `basic_arithmetic` (the quickstart's task: two numbers, + and -) as
   preference pairs, chosen = the right answer, rejected = a corrupted one (off by a little,
   the sign flipped, or digits swapped), with a held-out split sharing no question with train;
3. before: held-out preference accuracy (the share of pairs where the model gives the right
   answer the higher log-probability), the mean log-prob margin, and the exact-answer accuracy
   of greedy replies (`recipes/evaluate.py`, reasoning-gym's scorer);
4. DPO with LoRA (`recipes/dpo.py`, config `smollm2/135M_dpo_lora_quickstart`): the reference
   is the same model with its adapters disabled;
5. after: the same measurements with the adapter; a table and `DIR/summary.json`.

Seeds and the thread count are fixed, so the figures repeat.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = "smollm2/135M_dpo_lora_quickstart"
NUM_TRAIN, NUM_EVAL, SEED = 320, 100, 0


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer that looks like a right one."""
    value = int(answer)
    for _ in range(100):
        kind = rng.choice(["near", "near", "sign", "swap"])
        if kind == "near":
            wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
        elif kind == "sign":
            wrong = -value
        else:
            digits = str(abs(value))
            wrong = int(digits[::-1]) * (1 if value >= 0 else -1) if len(digits) > 1 else value + 1
        if wrong != value:
            return str(wrong)
    return str(value + 1)


def write_pairs(work: Path) -> dict[str, Path]:
    """`train_pairs.jsonl`, `eval_pairs.jsonl` (TRL's conversational form) and `eval.jsonl`
    (chat rows for the evaluate recipe), from the quickstart's task and system prompt."""
    from tunewright.data.reasoning_gym import make_splits
    from tunewright.training.atomic import atomic_write_text
    from tunewright.tune_cli.quickstart import SYSTEM_PROMPT, TASK, TASK_CONFIG

    splits = make_splits(TASK, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=SEED, task_config=TASK_CONFIG,
                         system_prompt=SYSTEM_PROMPT)
    rng = random.Random(SEED)
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        pairs = [{"prompt": row["messages"][:-1], "chosen": [{"role": "assistant", "content": row["answer"]}],
                  "rejected": [{"role": "assistant", "content": corrupt(row["answer"], rng)}]} for row in rows]
        files[f"{split}_pairs"] = out / f"{split}_pairs.jsonl"
        atomic_write_text(files[f"{split}_pairs"], "".join(json.dumps(p) + "\n" for p in pairs))
    files["eval"] = out / "eval.jsonl"
    atomic_write_text(files["eval"], "".join(json.dumps(r) + "\n" for r in splits["eval"]))
    return files


def preference(model_dir: Path, pairs: Path, adapter: Path | None) -> dict[str, float]:
    """Held-out: share of pairs whose chosen answer has the higher log-prob, mean log-prob margin."""
    import torch

    from tunewright.data.preference import collate_pairs, preference_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.peft_adapter import load_peft_adapter
    from tunewright.training.objectives import sequence_logprobs

    tokenizer = load_tokenizer(model_dir)
    dataset = preference_dataset(tokenizer, source=str(pairs))
    model = load_pretrained(model_dir).eval()
    if adapter is not None:
        load_peft_adapter(model, adapter)
    margins = []
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            logps, _ = sequence_logprobs(model, collate_pairs(items, pad_id=tokenizer.pad_id, padding_free=True))
            margins.append(logps[: len(items)] - logps[len(items):])
    margin = torch.cat(margins)
    return {"accuracy": float((margin > 0).double().mean()), "margin": float(margin.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="out/dpo_demo")
    args = parser.parse_args()
    work = Path(args.work_dir)
    start = time.perf_counter()

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import run_recipe_file
    from tunewright.tune_cli.catalog import configs, recipes
    from tunewright.tune_cli.quickstart import _convert, _evaluate

    def stage(title: str) -> None:
        print(f"\n== {title} (at {time.perf_counter() - start:.0f} s)", flush=True)

    stage("model")
    model_dir = _convert(work / "model")
    stage("data")
    files = write_pairs(work)
    overrides = [f"model.path={model_dir}", f"dataset.source={files['train_pairs']}",
                 f"val_dataset.source={files['eval_pairs']}", f"output_dir={work / 'dpo'}", "overwrite_output_dir=true"]
    train_cfg = to_dict(load_config(configs()[CONFIG], overrides))
    # the evaluate recipe reads chat rows with the training config's model and tokenizer
    eval_cfg = {**train_cfg, "dataset": {"_component_": "tunewright.data.sft_dataset", "source": str(files["eval"]),
                                         "format": "chat"}}

    stage("before: held-out preference and exact-answer accuracy")
    before = {**preference(model_dir, files["eval_pairs"], None),
              "exact": _evaluate(eval_cfg, files["eval"], work / "eval_base", adapter=None)["accuracy"]}
    stage("DPO with LoRA")
    print(f"tune run dpo --config {CONFIG} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    history = run_recipe_file(recipes()["dpo"], configs()[CONFIG], overrides)
    train_s = time.perf_counter() - t0
    stage("after")
    adapter = work / "dpo" / "adapter"
    after = {**preference(model_dir, files["eval_pairs"], adapter),
             "exact": _evaluate(eval_cfg, files["eval"], work / "eval_dpo", adapter=adapter)["accuracy"]}
    held_out = [r for r in history if "val_accuracy" in r]

    seconds = time.perf_counter() - start
    rows = [("", "base", "after DPO"),
            ("held-out preference accuracy", f"{before['accuracy']:.2f}", f"{after['accuracy']:.2f}"),
            ("held-out log-prob margin", f"{before['margin']:+.2f}", f"{after['margin']:+.2f}"),
            ("exact-answer accuracy", f"{before['exact']:.2f}", f"{after['exact']:.2f}")]
    print(f"\nSmolLM2-135M-Instruct, DPO (LoRA) on reasoning-gym arithmetic pairs: {NUM_TRAIN} train, "
          f"{NUM_EVAL} held-out\n")
    for row in rows:
        print("  " + "   ".join(cell.ljust(30 if i == 0 else 10) for i, cell in enumerate(row)).rstrip())
    print(f"\nDPO: {len(history and [r for r in history if 'loss' in r])} logged steps in {train_s:.0f} s; "
          f"held-out reward accuracy / margin during training: "
          + ", ".join(f"step {r['step']}: {r['val_accuracy']:.2f} / {r['val_margin']:+.2f}" for r in held_out))
    print(f"total {seconds:.0f} s")
    summary = {"before": before, "after": after, "train_seconds": round(train_s, 1), "seconds": round(seconds, 1),
               "held_out_during_training": held_out, "num_train": NUM_TRAIN, "num_eval": NUM_EVAL}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
