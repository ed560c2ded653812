"""GRPO demo, offline on the CPU: SmolLM2-135M-Instruct gets better at 1-digit arithmetic from
its own samples and a verifiable reward.

    .venv/bin/python bench/grpo_demo.py [--work-dir out/grpo_demo] [--model-dir out/quickstart/model]
                                        [--steps 30] [--num-eval 100]

1. model: SmolLM2-135M-Instruct from the GGUF file the quickstart uses (`tune quickstart`'s
   conversion, reused when `--model-dir` or `DIR/model` holds it);
2. prompts: reasoning-gym `basic_arithmetic` (two 1-digit numbers), generated from the seed
   after 3 solved examples (config `smollm2/135M_grpo_lora_single_device`); held-out prompts
   from another seed;
3. before: the base model's held-out exact-answer accuracy (greedy replies, reasoning-gym's
   scorer);
4. GRPO with LoRA (`recipes/grpo.py`) for `--steps` steps, on the CPU in fp32;
5. after: the same held-out accuracy with the adapter, and the mean sampled reward of the first
   and last 10 steps; a table and `DIR/summary.json`.

Seeds and the thread count are fixed, so the figures repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIG = "smollm2/135M_grpo_lora_single_device"


def held_out_accuracy(cfg: dict, adapter: Path | None) -> float:
    """Share of the config's held-out prompts whose greedy reply reasoning-gym scores right."""
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.peft_adapter import load_peft_adapter
    from tunewright.training.data_setup import make_batches
    from tunewright.training.instantiate import instantiate
    from tunewright.training.rewards import RewardSet, evaluate_rewards, reasoning_gym_score

    tokenizer = load_tokenizer(cfg["model"]["path"])
    prompts = instantiate(cfg["val_dataset"], tokenizer=tokenizer)
    model = load_pretrained(cfg["model"]["path"]).eval()
    if adapter is not None:
        load_peft_adapter(model, adapter)
    batches = make_batches(prompts, pad_id=tokenizer.pad_id, batch_size=25, shuffle=False)
    rewards = RewardSet([reasoning_gym_score()])
    scores = evaluate_rewards(model, batches, rewards, tokenizer, max_new_tokens=cfg["max_new_tokens"], device="cpu")
    return float(scores["val_reward"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="out/grpo_demo")
    parser.add_argument("--model-dir", default=None, help="a converted SmolLM2-135M-Instruct (else DIR/model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-eval", type=int, default=100)
    args = parser.parse_args()
    work = Path(args.work_dir)
    start = time.perf_counter()

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import run_recipe_file
    from tunewright.tune_cli.catalog import configs, recipes
    from tunewright.tune_cli.quickstart import _convert

    def stage(title: str) -> None:
        print(f"\n== {title} (at {time.perf_counter() - start:.0f} s)", flush=True)

    stage("model")
    model_dir = _convert(Path(args.model_dir) if args.model_dir else work / "model")
    overrides = [f"model.path={model_dir}", "device=cpu", "dtype=fp32", "num_threads=2", f"max_steps={args.steps}",
                 f"val_dataset.size={args.num_eval}", "eval_every_n_steps=null", "save_every_n_steps=null",
                 "progress_bar=false", f"output_dir={work / 'grpo'}", "overwrite_output_dir=true",
                 "resume_from_checkpoint=false"]
    cfg = to_dict(load_config(configs()[CONFIG], overrides))

    stage("before: held-out exact-answer accuracy of the base model")
    before = held_out_accuracy(cfg, None)
    print(f"base: {before:.2f}", flush=True)
    stage("GRPO with LoRA")
    print(f"tune run grpo --config {CONFIG} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    history = run_recipe_file(recipes()["grpo"], configs()[CONFIG], overrides)
    train_s = time.perf_counter() - t0
    stage("after")
    after = held_out_accuracy(cfg, work / "grpo" / "adapter")

    steps = [r for r in history if "loss" in r]
    key = "rewards/reasoning_gym/mean"
    first, last = (sum(r[key] for r in rows) / len(rows) for rows in (steps[:10], steps[-10:]))
    print(f"\nSmolLM2-135M-Instruct, GRPO (LoRA) on reasoning-gym 1-digit arithmetic, {args.steps} steps "
          f"of {cfg['batch_size']} completions ({train_s:.0f} s)\n")
    print(f"  {'':34}{'base':>8}{'after':>8}")
    print(f"  {'held-out greedy exact accuracy':34}{before:8.2f}{after:8.2f}")
    print(f"  {'sampled reward, first / last 10 steps':34}{first:8.2f}{last:8.2f}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    summary = {"held_out_accuracy": {"before": before, "after": after},
               "sampled_reward": {"first_10": first, "last_10": last}, "steps": args.steps,
               "train_seconds": round(train_s, 1), "num_eval": args.num_eval}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
