"""Start-up time of `tune`, and the tiny recipes' throughput and peak memory.

    .venv/bin/python bench/startup_and_train.py [--runs 5] [--steps 30]

Prints: `tune --help` / `tune ls` wall time (median of --runs fresh processes), then for the
full and LoRA recipes on their tiny configs: median tokens/s over the steps after warm-up (from
metrics.jsonl), wall time and peak RSS of the whole `tune run` process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TUNE = [sys.executable, "-m", "tunewright.tune_cli.main"]


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_recipe(recipe: str, config: str, steps: int, out: Path) -> dict:
    cmd = [*TUNE, "run", recipe, "--config", config, f"output_dir={out}", f"max_steps={steps}",
           "eval_every_n_steps=null", "save_every_n_steps=null", "progress_bar=false",
           "save_final_model=false", "num_threads=2"]
    # A fresh grandchild per run: RUSAGE_CHILDREN of this wrapper is that run's peak alone.
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    peak = int(done.stdout.strip().splitlines()[-1])  # KiB
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r][3:]  # skip warm-up
    return {
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps_rows),
        "wall_s": elapsed,
        "peak_rss_mb": peak / 1024,
        "first_loss": rows[0]["loss"],
        "last_loss": [r for r in rows if "loss" in r][-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    print(f"tune --help: {wall([*TUNE, '--help'], args.runs) * 1000:.0f} ms (median of {args.runs})")
    print(f"tune ls:     {wall([*TUNE, 'ls'], args.runs) * 1000:.0f} ms (median of {args.runs})")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, config in (("sft", "llama/tiny_full"), ("sft", "llama/tiny_lora")):
            r = run_recipe(recipe, config, args.steps, Path(tmp) / config.replace("/", "_"))
            print(f"{recipe} ({config}, {args.steps} steps): {r['tokens_per_second']:.0f} tokens/s "
                  f"(median after 3 warm-up steps), wall {r['wall_s']:.1f} s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")


if __name__ == "__main__":
    main()
