"""The same DPO LoRA job through tunewright (`recipes/dpo.py`) and TRL's `DPOTrainer`, interleaved.

    .venv/bin/python bench/dpo_vs_trl.py [--repeats 2] [--steps 12] [--batch-size 4] [--device cpu]

The job: SmolLM2-135M-Instruct (the quickstart's GGUF conversion, `out/quickstart/model`, made
by `tune quickstart` or here), LoRA rank 8 / alpha 16 on q, k, v, o, gate, up, down, DPO
(sigmoid, β 0.1) with the reference = the model with its adapters disabled, the same
generated pairs in TRL's conversational form (prompts of 40-160 words, answers of 10-120), the
same batch size, max length 512, AdamW at a constant lr, fp32, 2 threads, `--steps` steps in
file order. Each run is a fresh process (stacks alternate, `--repeats` times); it reports the
pairs per second of the steps after the first two and its peak RSS (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first").split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP = 2  # steps not timed: allocator and thread-pool warm-up


def write_pairs(path: Path, num: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = [{"prompt": [{"role": "user", "content": text(40, 160)}],
             "chosen": [{"role": "assistant", "content": text(10, 120)}],
             "rejected": [{"role": "assistant", "content": text(10, 120)}]} for _ in range(num)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_ours(args: argparse.Namespace, out: Path) -> dict:
    from tunewright.training.entry import run_recipe_file

    overrides = [f"model.path={args.model}", f"dataset.source={args.pairs}", "dataset.split=train",
                 "~val_dataset", f"output_dir={out}", "overwrite_output_dir=true", f"batch_size={args.batch_size}",
                 f"max_steps={args.steps}", "gradient_accumulation_steps=1", "~lr_scheduler", "optimizer.lr=5e-5",
                 "shuffle=false",
                 "num_threads=2", f"device={args.device}", "dtype=fp32", "progress_bar=false",
                 "enable_activation_checkpointing=false", "eval_every_n_steps=null", "save_every_n_steps=null",
                 "save_adapter=false", "dataset.max_seq_len=512", "lora_rank=8", "lora_alpha=16",
                 "resume_from_checkpoint=false", "log_every_n_steps=1"]
    config = REPO / "configs" / "smollm2" / "135M_dpo_lora_single_device.yaml"
    history = run_recipe_file(REPO / "recipes" / "dpo.py", config, overrides)
    times = [r["time"] for r in history if "loss" in r]
    return {"step_end_times": times, "losses": [r["loss"] for r in history if "loss" in r]}


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    times: list[float] = []
    losses: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.time())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                       report_to=[], save_strategy="no", beta=0.1, loss_type=["sigmoid"], max_length=512,
                       use_cpu=args.device == "cpu", bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                       gradient_checkpointing=False, max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True)
    train = datasets.Dataset.from_json(str(args.pairs))
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {"step_end_times": times, "losses": losses}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    result = (run_ours if args.stack == "tunewright" else run_trl)(args, out / "run")
    t = result["step_end_times"]
    timed = len(t) - 1 - WARMUP
    result["pairs_per_s"] = timed * args.batch_size / (t[-1] - t[WARMUP]) if timed > 0 else float("nan")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "result.json").write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default="out/dpo_vs_trl")
    parser.add_argument("--model", default="out/quickstart/model")
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stack:
        child(args)
        return 0

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        from tunewright.tune_cli.quickstart import _convert

        model = _convert(model)
    pairs = work / "pairs.jsonl"
    write_pairs(pairs, args.steps * args.batch_size)
    results: dict[str, list[dict]] = {"tunewright": [], "trl": []}
    for rep in range(args.repeats):
        for stack in ("tunewright", "trl") if rep % 2 == 0 else ("trl", "tunewright"):
            out = work / f"{stack}_{rep}"
            out.mkdir(exist_ok=True)
            cmd = [sys.executable, __file__, "--stack", stack, "--out", str(out), "--pairs", str(pairs),
                   "--model", str(model.resolve()), "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--device", args.device]
            env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            result = json.loads((out / "result.json").read_text())
            results[stack].append(result)
            print(f"{stack:>10} run {rep + 1}: {result['pairs_per_s']:.2f} pairs/s, peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB, loss@1 {result['losses'][0]:.4f} loss@{args.steps} "
                  f"{result['losses'][-1]:.4f}", flush=True)
    ours, theirs = results["tunewright"], results["trl"]
    speed = statistics.median(r["pairs_per_s"] for r in ours) / statistics.median(r["pairs_per_s"] for r in theirs)
    memory = statistics.median(r["peak_rss_mb"] for r in ours) / statistics.median(r["peak_rss_mb"] for r in theirs)
    print(f"\ntunewright / TRL: pairs/s {speed:.2f}x, peak RSS {memory:.2f}x (medians of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
