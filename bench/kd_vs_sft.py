"""Distillation against plain SFT on the quickstart's task, offline on the CPU: does a student
taught by a fine-tuned teacher answer more held-out questions right than one trained on the
same rows for the same steps?

    .venv/bin/python bench/kd_vs_sft.py [--steps 20] [--work-dir out/kd_vs_sft]

Teacher: the quickstart's fine-tuned SmolLM2-135M-Instruct (`out/quickstart/lora/merged`, 80
LoRA steps on reasoning-gym arithmetic: 0% -> ~62% exact). Student: the base model
(`out/quickstart/model`), LoRA rank 8 as the quickstart's. Three runs of
`recipes/knowledge_distillation.py` from the same weights on the same batches (the
quickstart's train rows in order, 8 a step, lr 2e-3, fp32, 2 threads), `--steps` steps each:

- sft: `kd_ratio: 0`, i.e. plain cross-entropy on the dataset's replies (the recipe's losses
  then equal the SFT recipe's, tests/test_recipe_kd.py);
- kd: `kd_ratio: 0.5`, half cross-entropy, half forward KL to the teacher on those replies;
- on-policy: `lmbda: 1`, every step the student samples its own replies to the rows' prompts
  and learns the teacher's reverse KL on them (GKD, Agarwal et al. 2024), no dataset replies.

Each adapter is scored on the quickstart's 100 held-out questions (greedy, reasoning-gym's
scorer, the evaluate recipe as `tune quickstart` runs it). Needs `tune quickstart` once (its
model, data and merged model). Seeds and threads are fixed, so the figures repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = "smollm2/360M_to_135M_kd_lora_single_device"
RUNS = {"sft": ["kd_ratio=0.0"], "kd": ["kd_ratio=0.5", "kd_loss=forward_kl"],
        "on-policy": ["lmbda=1.0", "kd_loss=reverse_kl", "max_new_tokens=8", "temperature=1.0"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work-dir", default="out/kd_vs_sft")
    parser.add_argument("--quickstart", default="out/quickstart", help="the work directory `tune quickstart` wrote")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"a comma-separated subset of {', '.join(RUNS)}")
    args = parser.parse_args()
    quick, work = Path(args.quickstart), Path(args.work_dir)
    teacher = quick / "lora" / "merged"
    for needed in (quick / "model" / "config.json", teacher / "config.json", quick / "data" / "train.jsonl"):
        if not needed.is_file():
            parser.error(f"{needed} is missing: run `tune quickstart --work-dir {quick}` first")

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import run_recipe_file
    from tunewright.tune_cli.catalog import configs, recipes
    from tunewright.tune_cli.quickstart import _evaluate

    common = [
        f"model.path={quick / 'model'}", f"teacher_model.path={teacher}", "teacher_dtype=fp32", "dtype=fp32",
        "device=cpu", "num_threads=2", "seed=0", "tokenizer.max_seq_len=64",
        f"dataset.source={quick / 'data' / 'train.jsonl'}", "dataset.format=chat", "dataset.split=train",
        "dataset.packed=false", "~val_dataset", "optimizer.lr=2e-3", "optimizer.weight_decay=0.0",
        "lr_scheduler.num_warmup_steps=5", "batch_size=8", "gradient_accumulation_steps=1", f"max_steps={args.steps}",
        "enable_activation_checkpointing=false", "lora_rank=8", "lora_alpha=16", "lora_dropout=0.0",
        "log_every_n_steps=5", "eval_every_n_steps=null", "save_every_n_steps=null", "resume_from_checkpoint=false",
        "overwrite_output_dir=true", "progress_bar=false",
    ]
    results: dict[str, dict] = {}
    base_cfg = None
    start = time.perf_counter()
    for name in [r for r in args.runs.split(",") if r]:
        out = work / name
        overrides = [*common, f"output_dir={out}", *RUNS[name]]
        print(f"\n== {name}: tune run knowledge_distillation --config {BASE_CONFIG} {' '.join(overrides)}", flush=True)
        t0 = time.perf_counter()
        history = run_recipe_file(recipes()["knowledge_distillation"], configs()[BASE_CONFIG], overrides)
        seconds = time.perf_counter() - t0
        cfg = to_dict(load_config(configs()[BASE_CONFIG], overrides))
        base_cfg = base_cfg or cfg
        scored = _evaluate(cfg, quick / "data" / "eval.jsonl", work / f"eval_{name}", adapter=out / "adapter")
        results[name] = {"accuracy": scored["accuracy"], "loss": scored["loss"], "train_seconds": round(seconds, 1),
                         "last_loss": next(r["loss"] for r in reversed(history) if "loss" in r)}
        print(f"{name}: held-out exact {scored['accuracy']:.2f}, answer-token loss {scored['loss']:.4f}, "
              f"{seconds:.0f} s", flush=True)
    teacher_cfg = {**base_cfg, "model": {**base_cfg["model"], "path": str(teacher)}}
    teacher_scored = _evaluate(teacher_cfg, quick / "data" / "eval.jsonl", work / "eval_teacher", adapter=None)
    print(f"\nSmolLM2-135M-Instruct student, {args.steps} steps of 8 rows each, held-out exact-answer accuracy "
          f"on the quickstart's 100 questions (teacher: {teacher_scored['accuracy']:.2f}):")
    for name, r in results.items():
        print(f"  {name:10s} {r['accuracy']:.2f}   (answer-token loss {r['loss']:.4f}, {r['train_seconds']:.0f} s)")
    summary = {"steps": args.steps, "teacher": teacher_scored["accuracy"], "runs": results,
               "seconds": round(time.perf_counter() - start, 1)}
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
