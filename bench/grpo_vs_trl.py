"""GRPO step time and peak memory: `recipes/grpo.py` against TRL's `GRPOTrainer` (use_vllm off),
on the CPU, interleaved.

    .venv/bin/python bench/grpo_vs_trl.py --model-dir out/quickstart/model [--steps 4] [--rounds 2]

Both train the same LoRA (rank 16 on q, k, v, o, gate, up, down) of a random model of
SmolLM2-135M's shape (its tokenizer; random weights, so no row stops early and both generate
`--new-tokens` tokens per row) on the same chat prompts (reasoning-gym arithmetic, 3-shot), G = 8
completions of `--prompts` prompts per step, one update per step, loss dapo, beta 0, fp32, no activation
checkpointing, `--threads` threads. Each run is its own process (peak RSS is the process's);
runs alternate ours, TRL, ours, ... The first step of each run is left out of its mean step
time (start-up).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "smollm2" / "135M_grpo_lora_single_device.yaml"
PATTERN = "^[a-m]"  # a reward with variance on random text: does the reply start with a-m
G, LR = 8, 5e-4


def random_model(source: Path, out: Path) -> Path:
    """A random model of `source`'s shape with its tokenizer files (made once)."""
    if (out / "config.json").is_file():
        return out
    import torch

    from tunewright.models import save_pretrained
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model
    from tunewright.models.registry import model_args

    model = build_model(model_args(source)[1], device="cpu")
    init_weights(model, seed=0)
    save_pretrained(model, out, source_dir=source, dtype=torch.float32)
    return out


def ours(model_dir: Path, work: Path, steps: int, new_tokens: int, threads: int, prompts: int) -> dict:
    from omegaconf import OmegaConf

    from tunewright.training.entry import run_recipe_file

    cfg = OmegaConf.load(CONFIG)
    cfg.rewards.functions = [{"_component_": "tunewright.training.rewards.format_reward", "pattern": PATTERN}]
    config = work / "ours.yaml"
    OmegaConf.save(cfg, config)
    history = run_recipe_file(REPO / "recipes" / "grpo.py", config, [
        f"model.path={model_dir}", "device=cpu", "dtype=fp32", f"num_threads={threads}", f"max_steps={steps}",
        f"batch_size={prompts * G}", f"num_generations={G}", f"max_new_tokens={new_tokens}", f"optimizer.lr={LR}",
        "~lr_scheduler", "~val_dataset", "eval_every_n_steps=null", "save_every_n_steps=null", "progress_bar=false",
        "ppo_epochs=1", "num_minibatches=1", f"output_dir={work / 'ours'}", "overwrite_output_dir=true",
        "resume_from_checkpoint=false", "save_adapter=false"])
    return {"step_times": [r["step_time"] for r in history if "step_time" in r],
            "tokens": [r["num_tokens"] for r in history if "num_tokens" in r]}


def trl(model_dir: Path, work: Path, steps: int, new_tokens: int, threads: int, prompts: int) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from tunewright.data.prompts import reasoning_gym_prompts
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.training.rewards import format_reward

    torch.set_num_threads(threads)
    task = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+"], allow_parentheses=False,
                allow_negation=False)
    items = reasoning_gym_prompts(load_tokenizer(model_dir), task="basic_arithmetic", size=prompts * steps,
                                  task_config=task, system_prompt="Reply with the number only.", num_few_shot=3)
    rows = datasets.Dataset.from_list([{"prompt": item["prompt"]} for item in items])
    reward = format_reward(PATTERN)

    def reward_fn(prompts, completions, **kwargs):
        return reward(prompts, [c[0]["content"] for c in completions])

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=prompts * G, num_generations=G,
                        max_completion_length=new_tokens, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                        use_cpu=True, bf16=False, gradient_checkpointing=False, loss_type="dapo", beta=0.0,
                        epsilon_high=0.28, temperature=1.0, logging_steps=1, save_strategy="no", report_to="none",
                        disable_tqdm=True, shuffle_dataset=False, seed=0, max_grad_norm=1.0, weight_decay=0.0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=rows, peft_config=lora,
                          callbacks=[Timer()])
    trainer.train()
    return {"step_times": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="out/quickstart/model", help="SmolLM2-135M(-Instruct) in HF format")
    parser.add_argument("--work-dir", default="out/grpo_vs_trl")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (x 8 completions)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = random_model(Path(args.model_dir), work / "random_model")
    if args.side:  # one run, in this process: its figures as the last line of stdout
        run = {"ours": ours, "trl": trl}[args.side]
        out = run(model_dir, work, args.steps, args.new_tokens, args.threads, args.prompts)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return 0
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        for side in ("ours", "trl"):
            done = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", args.model_dir,
                                   "--work-dir", str(work), "--steps", str(args.steps), "--new-tokens",
                                   str(args.new_tokens), "--threads", str(args.threads), "--prompts", str(args.prompts)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(done.stdout.strip().splitlines()[-1])
            results[side].append(run)
            print(f"{side}: step times {[round(t, 2) for t in run['step_times']]} s, "
                  f"peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    summary = {}
    for side, runs in results.items():
        summary[side] = {"step_s": statistics.median(t for r in runs for t in r["step_times"][1:]),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}
    ratio_t = summary["ours"]["step_s"] / summary["trl"]["step_s"]
    ratio_m = summary["ours"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]
    print(f"\nmedian step time: ours {summary['ours']['step_s']:.2f} s, TRL {summary['trl']['step_s']:.2f} s "
          f"(ours / TRL = {ratio_t:.2f}); peak RSS: ours {summary['ours']['peak_rss_mb']:.0f} MB, "
          f"TRL {summary['trl']['peak_rss_mb']:.0f} MB ({ratio_m:.2f})")
    (work / "summary.json").write_text(json.dumps({**summary, "step_ratio": ratio_t, "rss_ratio": ratio_m,
                                                   "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
