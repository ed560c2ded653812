"""The PPO recipe (recipes/ppo.py) on the tiny configs: at the first update of every rollout the
importance ratio is 1 and the policy loss is -mean(A); a step's advantages and returns equal
PPO's formulas computed here row by row in plain Python; a reward model's scores and a value
model started from it (and the held-out greedy reward) equal transformers'
LlamaForSequenceClassification on the same rows; kill + resume gives the uninterrupted run; the
tiny run learns its format reward (slow); 2 FSDP2 processes give one device's steps (slow); bad
inputs are one line each."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tunewright.training import ppo as ppo_math
from tunewright.training import rollout as rollout_module
from tunewright.training.entry import run_recipe_file
from tunewright.training.tiny_assets import tiny_asset

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "ppo.py"
LORA = REPO / "configs" / "llama" / "tiny_ppo_lora.yaml"
FULL = REPO / "configs" / "llama" / "tiny_ppo_full.yaml"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "save_every_n_steps=null",
        "save_final_model=false", "batch_size=8", "max_new_tokens=6"]
LOAD = "tunewright.models.load_pretrained"


def records(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def recorder(monkeypatch, module, name: str) -> list[tuple[tuple, dict, object]]:
    """Record every call of `module.name` (args, kwargs, result) while the recipe runs."""
    calls, real = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapped)
    return calls


def reference_advantages(scores, logps, ref_logps, values, lengths, *, kl_coef, gamma, lam):
    """PPO's step in plain Python, row by row (Ouyang et al.; TRL's PPOTrainer): k1 KL penalty
    on every token and the score on the last, GAE right to left, then whitening of all the
    step's advantages with the unbiased variance. Returns (whitened advantages, returns) per row."""
    advantages, returns = [], []
    for i, n in enumerate(lengths):
        reward = [-kl_coef * (logps[i][t] - ref_logps[i][t]) for t in range(n)]
        reward[n - 1] += scores[i]
        row, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[i][t + 1] if t + 1 < n else 0.0
            running = reward[t] + gamma * next_value - values[i][t] + gamma * lam * running
            row[t] = running
        advantages.append(row)
        returns.append([row[t] + values[i][t] for t in range(n)])
    flat = [a for row in advantages for a in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) + 1e-8)
    return [[(a - mean) / std for a in row] for row in advantages], returns


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_ratio_one_policy_loss_and_advantages_by_the_formulas(tmp_path: Path, monkeypatch, config: Path) -> None:
    losses = recorder(monkeypatch, ppo_math, "policy_loss")
    penalised = recorder(monkeypatch, ppo_math, "token_rewards")
    estimates = recorder(monkeypatch, ppo_math, "gae")
    whitened = recorder(monkeypatch, ppo_math, "masked_whiten")
    updates = 2 * 2  # ppo_epochs x num_minibatches policy-loss calls per step
    history = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}", "max_steps=2", "ppo_epochs=2",
                                               "num_minibatches=2", "kl_coef=0.1", *FAST])
    assert [r["step"] for r in history] == [1, 2] and len(losses) == 2 * updates
    for record in history:  # rollout log-probs = the training forward's, fp32, every token
        assert record["first_ratio_error"] < 1e-5, record
    assert abs(history[0]["kl"]) < 1e-6 < abs(history[1]["kl"])  # reference = policy until it trains
    for step in range(2):
        (new, old, adv, mask), _, first = losses[step * updates]
        assert ((new - old).exp() - 1).abs()[mask].max() < 1e-5
        want = -(adv[mask]).mean()  # PPO's surrogate at ratio 1
        assert abs(want) > 1e-3  # the first minibatch's advantages do not average to 0
        assert first.loss.item() == pytest.approx(want.item(), abs=1e-6)
        torch.testing.assert_close(adv, whitened[step][2][:len(adv)], rtol=0, atol=0)  # the whitened GAE

        (scores, logps, ref_logps, mask), options, _ = penalised[step]
        (_, values, _), gae_options, (_, returns) = estimates[step]
        advantages = whitened[step][2]
        lengths = mask.sum(1).tolist()
        rows = lambda x: [x[i, :n].tolist() for i, n in enumerate(lengths)]  # noqa: E731
        want_adv, want_ret = reference_advantages(scores.tolist(), rows(logps), rows(ref_logps), rows(values), lengths,
                                                  kl_coef=0.1, gamma=gae_options["gamma"], lam=gae_options["lam"])
        assert options == {"kl_coef": 0.1, "estimator": "k1"}
        assert (gae_options["gamma"], gae_options["lam"]) == (1.0, 0.95)
        for i, n in enumerate(lengths):
            assert advantages[i, :n].tolist() == pytest.approx(want_adv[i], abs=1e-5)
            assert returns[i, :n].tolist() == pytest.approx(want_ret[i], abs=1e-5)
            assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
        if step == 1:
            assert (ref_logps - logps)[mask].abs().max() > 1e-4  # the KL term is really in play


def _reward_model(directory: Path) -> Path:
    """The tiny Llama with a score head, in LlamaForSequenceClassification layout."""
    from tunewright.models import load_pretrained, save_pretrained

    torch.manual_seed(3)
    model = load_pretrained(tiny_asset("llama"), num_labels=1)
    return save_pretrained(model, directory, source_dir=tiny_asset("llama"), dtype=torch.float32)


def test_reward_model_scores_and_values_started_from_it_equal_transformers(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForSequenceClassification

    rm = _reward_model(tmp_path / "rm")
    rollouts = recorder(monkeypatch, rollout_module, "rollout")
    penalised = recorder(monkeypatch, ppo_math, "token_rewards")
    estimates = recorder(monkeypatch, ppo_math, "gae")
    history = run_recipe_file(RECIPE, LORA, [
        f"output_dir={tmp_path / 'out'}", "max_steps=1", "ppo_epochs=1", "num_minibatches=2", "~rewards",
        f"reward_model._component_={LOAD}", f"reward_model.path={rm}", f"value_model._component_={LOAD}",
        f"value_model.path={rm}", "missing_eos_penalty=2.0", *FAST, "eval_every_n_steps=1", "max_eval_batches=1"])
    out = rollouts[0][2]  # the step's rollout (the held-out greedy one comes after it)
    scores, values = penalised[0][0][0], estimates[0][0][1]
    hf = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, (prompt, completion) in enumerate(zip(out.prompts, out.completions)):
            hidden = hf.model(torch.tensor([prompt + completion])).last_hidden_state
            per_position = hf.score(hidden)[0, :, 0]  # the head at every position
            penalty = 2.0 if out.truncated[i] else 0.0  # missing_eos_penalty off a completion that never stopped
            assert scores[i].item() == pytest.approx(per_position[-1].item() - penalty, abs=1e-5)
            # V of completion token t: the head where t is predicted (one position before it)
            want = per_position[len(prompt) - 1:len(prompt) + len(completion) - 1]
            torch.testing.assert_close(values[i, :len(completion)], want, atol=1e-5, rtol=0)
    assert history[0]["reward"] == pytest.approx(scores.mean().item() + 2.0 * history[0]["truncated"], abs=1e-5)
    held_out = rollouts[1][2]  # greedy, scored by the reward model without the training penalty
    with torch.no_grad():
        want = [hf.score(hf.model(torch.tensor([p + c])).last_hidden_state)[0, -1, 0].item()
                for p, c in zip(held_out.prompts, held_out.completions)]
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_reward"] for r in logged if "val_reward" in r] == [pytest.approx(sum(want) / len(want), abs=1e-5)]


def test_kill_and_resume_gives_the_uninterrupted_rewards_and_losses(tmp_path: Path, monkeypatch) -> None:
    common = ["max_steps=4", "ppo_epochs=1", "num_minibatches=1", *FAST, "save_every_n_steps=2"]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, LORA, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 7)  # 2 optimizer steps (policy, value) per step: step 4's first
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, LORA, [f"output_dir={resumed}", *common])
    assert sorted(records(resumed)) == [1, 2, 3]
    run_recipe_file(RECIPE, LORA, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    want, got = records(straight), records(resumed)
    for step in (1, 2, 3, 4):  # same samples (generator in the checkpoint), same policy and value updates
        for key in ("loss", "policy_loss", "value_loss", "reward", "score", "completion_length", "grad_norm",
                    "value_grad_norm"):
            assert got[step][key] == want[step][key], (step, key)
    assert len({want[s]["value_loss"] for s in want}) > 1


@pytest.mark.slow
def test_the_tiny_run_learns_its_format_reward(tmp_path: Path) -> None:
    """The tiny random model cannot solve the tasks (exact match stays 0), but the rewarded
    behaviour (a reply starting with a letter or digit) rises from chance. One run of 16 samples
    a step is noisy: over seeds 0-5 (30 steps) the mean of the last 10 steps rose over the first
    10 by +0.25, +0.06, +0.18, +0.13, +0.15, +0.37 (seed 0 here: 0.28 -> 0.53); ~40 CPU-seconds."""
    history = run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path}", "progress_bar=false", "num_threads=1",
                                             "save_every_n_steps=null", "eval_every_n_steps=null", "max_new_tokens=4",
                                             "max_steps=30"])
    steps = [r for r in history if "loss" in r]
    assert len(steps) >= 25
    mean = lambda rows: sum(r["rewards/format/mean"] for r in rows) / len(rows)  # noqa: E731
    assert mean(steps[-10:]) > mean(steps[:10]) + 0.1
    assert all(r["first_ratio_error"] < 1e-5 for r in steps)


# ---------------------------------------------------------------- bad inputs
def _other_vocabulary(directory: Path) -> Path:
    shutil.copytree(tiny_asset("llama"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    return directory


@pytest.mark.parametrize("config,overrides,message", [
    (LORA, lambda tmp: [f"value_model._component_={LOAD}", f"value_model.path={_other_vocabulary(tmp / 'v')}",
                        "value_model.num_labels=1"],
     "value_model: {tmp}/v/config.json has vocab_size 320, the policy's"),
    (LORA, lambda tmp: [f"value_model._component_={LOAD}", f"value_model.path={tiny_asset('llama')}",
                        "value_model.num_labels=2"], "has a score head of 2 labels; a value model has one"),
    (LORA, lambda tmp: [f"value_model._component_={LOAD}", f"value_model.path={tiny_asset('llama')}"],
     "is a causal language model with no score head; add `num_labels: 1` to value_model"),
    (FULL, lambda tmp: ["~ref_model"], "kl_coef (0.05) > 0 needs a reference policy, and full fine-tuning has none"),
    (LORA, lambda tmp: ["~rewards", f"reward_model._component_={LOAD}", f"reward_model.path={tiny_asset('llama')}"],
     "is a causal language model with no trained score head"),
    (LORA, lambda tmp: [f"reward_model._component_={LOAD}", f"reward_model.path={tiny_asset('llama')}"],
     "exactly one of them"),
    (LORA, lambda tmp: ["num_minibatches=8", "gradient_accumulation_steps=2"], "more than the batch_size (8)"),
], ids=["value-vocab", "value-labels", "value-no-head", "kl-no-reference", "reward-no-head", "two-rewards",
        "minibatches"])
def test_bad_inputs_are_one_line_before_any_weight_loads(tmp_path: Path, capsys, config, overrides, message) -> None:
    with pytest.raises(ValueError) as e:
        run_recipe_file(RECIPE, config, [f"output_dir={tmp_path / 'out'}", "max_steps=1", *FAST, *overrides(tmp_path)])
    assert message.format(tmp=tmp_path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "parameters," not in capsys.readouterr().out  # no model was loaded


# ---------------------------------------------------------------- FSDP2
def test_fsdp2_checkpoint_after_a_held_out_rollout(tmp_path: Path) -> None:
    # One process under FSDP2 (no torchrun): the held-out greedy rollout leaves the root module
    # gathered; the step checkpoint after it must still hold the shards its optimizers step.
    history = run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path}", "distributed=true", "max_steps=1",
                                             "ppo_epochs=1", "num_minibatches=1", *FAST, "eval_every_n_steps=1",
                                             "max_eval_batches=1", "save_every_n_steps=1"])
    assert [r["step"] for r in history] == [1]
    assert (tmp_path / "checkpoints" / "step_000001").is_dir()
    assert not torch.distributed.is_initialized()


GREEDY = '''"""recipes/ppo.py with greedy rollouts (temperature-1 log-probs): the rows do not depend on how
the prompts are split over processes, so 2 processes must give one device's steps."""
import sys

from tunewright.training import rollout
from tunewright.training.entry import recipe_main

sampled = rollout.rollout
rollout.rollout = lambda *args, **kwargs: sampled(*args, **{**kwargs, "temperature": 0.0})
recipe_main(sys.argv.pop(1))
'''


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_device_on_the_same_rollouts(tmp_path: Path, monkeypatch) -> None:
    common = ["max_steps=2", "ppo_epochs=2", "num_minibatches=2", *FAST[:-2], "max_new_tokens=6",
              "eval_every_n_steps=2", "max_eval_batches=1", "save_every_n_steps=2"]  # a checkpoint after held-out
    sampled = rollout_module.rollout
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **k: sampled(*a, **{**k, "temperature": 0.0}))
    run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path / 'one'}", "batch_size=8", *common])
    (tmp_path / "greedy.py").write_text(GREEDY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend",
           "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(tmp_path / "greedy.py"), str(RECIPE), "--config", str(LORA),
           f"output_dir={tmp_path / 'two'}", "batch_size=4", *common]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:  # rows split 4 + 4 over the ranks: whitening and token means over both
        for key in ("loss", "policy_loss", "value_loss", "reward", "kl", "completion_length", "grad_norm",
                    "value_grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert got[step]["first_ratio_error"] < 1e-5
