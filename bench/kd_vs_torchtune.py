"""Knowledge distillation, one CPU job through torchtune 0.6.1's `knowledge_distillation_single_device`
(stock recipe) and tunewright's `knowledge_distillation`, interleaved: steady-state tokens/s and peak RSS.

    ../shared/bench/setup_envs.sh --only tt                 # torchtune 0.6.1 venv, once
    .venv/bin/python bench/kd_vs_torchtune.py --steps 8 --repeats 2

The job is ../shared/bench's (default: the SmolLM2-135M shape, LoRA on every linear layer, fp32,
2 threads, batch 4 Alpaca rows in file order, max_seq_len 512); the teacher is the same
checkpoint loaded whole and frozen, so the figures are the cost of a KD step (student forward and
backward + teacher forward + both losses), not what it learns. Both: forward KL, kd_ratio 0.5.
Throughput counts each step's real (non-padding) tokens, the same rows in both stacks (tunewright's
`num_tokens`), over the wall time from the end of step 1 to the end of the last step; peak RSS is
the recipe process's (GNU time). The step-1 cross-entropy of both stacks is printed: equal values
say the two ran the same model on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("TUNEWRIGHT_BENCH_HOME", REPO.parent / "shared" / "bench"))
WORK = Path(os.environ.get("TUNEWRIGHT_BENCH_DIR", "/tmp/tunewright-bench"))


def torchtune_command(job: dict, out: Path) -> list[str]:
    sys.path.insert(0, str(BENCH))
    from benchlib.job import tt_argv  # the harness's job -> torchtune overrides

    model, ckpt = job["model"], sorted(f.name for f in Path(job["model_dir"]).glob("*.safetensors"))
    teacher = [
        "teacher_model._component_=torchtune.models.llama3_2.llama3_2",
        f"teacher_model.vocab_size={model['vocab_size']}", f"teacher_model.num_layers={model['num_layers']}",
        f"teacher_model.num_heads={model['num_heads']}", f"teacher_model.num_kv_heads={model['num_kv_heads']}",
        f"teacher_model.embed_dim={model['hidden_size']}", f"teacher_model.intermediate_dim={model['intermediate_size']}",
        f"teacher_model.max_seq_len={model['max_position_embeddings']}", f"teacher_model.norm_eps={model['rms_norm_eps']}",
        f"teacher_model.rope_base={int(round(model['rope_theta']))}", "teacher_model.scale_factor=1",
        f"teacher_model.tie_word_embeddings={model['tie_word_embeddings']}",
        "teacher_checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
        f"teacher_checkpointer.checkpoint_dir={job['model_dir']}", f"teacher_checkpointer.checkpoint_files=[{','.join(ckpt)}]",
        f"teacher_checkpointer.output_dir={out}", "teacher_checkpointer.model_type=LLAMA3_2",
        "kd_loss._component_=torchtune.modules.loss.ForwardKLWithChunkedOutputLoss", "kd_ratio=0.5",
    ]
    return [str(WORK / "peer-tt" / "bin" / "tune"), "run",
            *tt_argv(job, str(out), str(BENCH / "configs"), recipe="knowledge_distillation_single_device"), *teacher]


def tunewright_command(job: dict, out: Path) -> list[str]:
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "bench"))
    from peer_adapter import config_for  # the same job -> tunewright config as the SFT comparison

    cfg = {**config_for(job, out), "recipe": "knowledge_distillation", "kd_loss": "forward_kl", "kd_ratio": 0.5,
           "teacher_dtype": job["dtype"],
           "teacher_model": {"_component_": "tunewright.models.load_pretrained", "path": job["model_dir"]}}
    path = out / "tunewright_config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return [str(REPO / ".venv" / "bin" / "tune"), "run", "knowledge_distillation", "--config", str(path)]


def run(command: list[str], out: Path, threads: int) -> int:
    """Peak RSS (KiB) of the run; its log in out/log.txt."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(BENCH),
           "TUNEWRIGHT_CACHE": str(WORK / "cache" / "tunewright")}
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *command], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=out)
    text = (out / "log.txt").read_text()
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}); see {out / 'log.txt'}:\n{text[-2000:]}")
    return int(re.findall(r"maxrss_kb=(\d+)", text)[-1])


def step_times(out: Path, stack: str) -> tuple[list[float], float]:
    """(time at the end of each step, step-1 cross-entropy) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if stack == "tt":
        steps = [r for r in rows if r.get("event") == "step" and "class_loss" in r]
        return [r["t"] for r in steps], steps[0]["class_loss"]
    steps = [r for r in rows if "ce_loss" in r]
    return [r["time"] for r in steps], steps[0]["ce_loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=WORK / "assets" / "jobs" / "smollm2_lora-all.json")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="kd")
    args = parser.parse_args()
    job = {**json.loads(args.job.read_text()), "steps": args.steps}

    results: dict[str, list[tuple[float, float, float]]] = {"tt": [], "tw": []}
    tokens: list[int] | None = None
    for repeat in range(args.repeats):
        for stack in ("tt", "tw"):  # interleaved: slow drift in background load hits both
            out = WORK / "runs" / f"{args.tag}_{stack}_r{repeat}"
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("*"):
                if stale.is_file():
                    stale.unlink()
            command = torchtune_command(job, out) if stack == "tt" else tunewright_command(job, out)
            rss = run(command, out, job["threads"])
            times, ce = step_times(out, stack)
            if stack == "tw":
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                tokens = [r["num_tokens"] for r in rows if "num_tokens" in r]
            results[stack].append((times, rss / 1024, ce))
    assert tokens is not None and len(tokens) == args.steps
    print(f"job {args.job.name}: {args.steps} steps, batch {job['batch_size']}, max_seq_len {job['max_seq_len']}, "
          f"{job['dtype']}, {job['threads']} threads; teacher = the same checkpoint, forward KL, kd_ratio 0.5")
    summary = {}
    for stack, runs in results.items():
        rates = [sum(tokens[1:]) / (times[-1] - times[0]) for times, _, _ in runs]
        summary[stack] = (max(rates), max(r for _, r, _ in runs))
        name = "torchtune 0.6.1" if stack == "tt" else "tunewright"
        print(f"  {name:16s} tokens/s {' '.join(f'{r:.0f}' for r in rates)} (best {max(rates):.0f}) | peak RSS "
              f"{' '.join(f'{r:.0f}' for _, r, _ in runs)} MiB | step-1 cross-entropy {runs[0][2]:.5f}")
    (tt_rate, tt_rss), (tw_rate, tw_rss) = summary["tt"], summary["tw"]
    print(f"  tunewright / torchtune: tokens/s x{tw_rate / tt_rate:.2f}, peak RSS x{tw_rss / tt_rss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
