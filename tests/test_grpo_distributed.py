"""GRPO under FSDP2 on 2 CPU processes (slow tier): rollouts where one rank's rows stop at once and
the other's run on decode what one process alone does (a rank that stopped on its own would leave
the other waiting in a weight gather), and the recipe runs with the first ratio at 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = '''"""Greedy rollouts under FSDP2 on 2 processes where rank 0's row stops at once and rank 1's runs
on: each rank gets what one process alone decodes (no rank waits forever for the other)."""
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from tunewright.models import ModelArgs, build_model
from tunewright.models.builder import init_weights
from tunewright.training import rollout as R

dist.init_process_group("gloo")
rank = dist.get_rank()
if os.environ.get("UNSYNCED"):  # the old rule: a rank stops when its own rows are done
    R._done_everywhere = lambda done, device: done
ARGS = ModelArgs(family="llama", vocab_size=101, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=128)


def tiny():
    model = build_model(ARGS, device="cpu")
    init_weights(model, seed=0, std=0.3)
    return model.eval()


prompts = [[[1, 5, 7, 9], [2, 2]], [[3, 4, 8], [60, 7]]]  # rank 0's, rank 1's
alone = tiny()
stop = R.rollout(alone, prompts[0], max_new_tokens=1, temperature=0.0).completions  # rank 0 stops at once
stops = {row[0] for row in stop}
want = [R.rollout(alone, p, max_new_tokens=10, temperature=0.0, stop_ids=stops).completions for p in prompts]
assert all(len(c) == 1 for c in want[0]) and any(len(c) > 1 for c in want[1]), want
model = tiny()
for layer in model.layers:
    fully_shard(layer)
fully_shard(model)
got = R.rollout(model, prompts[rank], max_new_tokens=10, temperature=0.0, stop_ids=stops).completions
assert got == want[rank], (rank, got, want[rank])
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
'''


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_ranks_whose_rows_stop_at_different_steps_decode_as_one_process(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    done = _torchrun("script.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout


@pytest.mark.slow
def test_recipe_runs_under_fsdp2(tmp_path: Path) -> None:
    done = _torchrun(str(REPO / "recipes" / "grpo.py"), "--config", str(REPO / "configs" / "llama" / "tiny_grpo.yaml"),
                     f"output_dir={tmp_path / 'out'}", "max_steps=2", "progress_bar=false", "batch_size=8",
                     "num_generations=4", "max_new_tokens=6", "eval_every_n_steps=null", "save_every_n_steps=null",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["first_ratio_error"] < 1e-5 for r in steps)


FIXED = '''"""The GRPO recipe with rollouts fixed by the prompt (the same rows on one device and on
2 processes, whatever each rank's sampling stream): `rollout` replaced before the recipe runs."""
import sys

import torch

from tunewright.training import rollout as R
from tunewright.training.entry import run_recipe_file
from tunewright.training.grpo import completion_logprobs, rollout_batch


def fixed_rollout(model, prompts, *, num_generations, temperature=1.0, vocab_size=None, **_):
    rows = [list(p) for p in prompts for _ in range(num_generations)]
    completions = [[(sum(p) * 7 + 13 * j + 5 * k) % (vocab_size or 64) + 1 for k in range(1 + j % 3)]
                   for i, p in enumerate(rows) for j in [i % num_generations]]
    with torch.no_grad():
        logp = completion_logprobs(model, rollout_batch(rows, completions), temperature=temperature)[0]
    return R.Rollouts(prompts=rows, completions=completions, logprobs=list(logp.split([len(c) for c in completions])),
                      truncated=[False] * len(rows))


R.rollout = fixed_rollout
recipe, config, *overrides = sys.argv[1:]
run_recipe_file(recipe, config, overrides)
'''


@pytest.mark.slow
def test_fsdp2_on_two_processes_equals_one_device_for_fixed_rollouts(tmp_path: Path) -> None:
    """Each rank scores and trains its own groups; the step's normalisers (dapo: tokens of all
    ranks) and FSDP's gradient reduction make the update the one device's over all groups. One
    minibatch per pass: minibatches of several ranks' rows are other row sets than one device's."""
    (tmp_path / "fixed.py").write_text(FIXED)
    args = [str(REPO / "recipes" / "grpo.py"), str(REPO / "configs" / "llama" / "tiny_grpo.yaml"), "max_steps=3",
            "progress_bar=false", "num_generations=4", "max_new_tokens=6", "eval_every_n_steps=null",
            "save_every_n_steps=null", "save_final_model=false", "ppo_epochs=2", "num_minibatches=1", "loss_type=dapo",
            "beta=0.1", "num_threads=1"]
    one = subprocess.run([sys.executable, "fixed.py", *args, f"output_dir={tmp_path / 'one'}", "batch_size=8"],
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("fixed.py", *args, f"output_dir={tmp_path / 'two'}", "batch_size=4", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]

    def steps(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9), x["step"]  # the same groups were scored
        for key in ("frac_reward_zero_std", "completion_length", "completion_length_max", "truncated"):
            assert x[key] == pytest.approx(y[key], abs=1e-9), (x["step"], key)  # all ranks' rows counted
        for key in ("loss", "grad_norm", "kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert any(abs(x["loss"]) > 1e-6 for x in a) and a[-1]["kl"] > 0  # the updates did something
