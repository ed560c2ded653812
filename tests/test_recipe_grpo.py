"""The GRPO recipe (recipes/grpo.py) on the tiny config: the importance ratio of the first update
of every rollout is 1 (rollout and training compute the same numbers), the KL starts at 0 against
either reference, accumulation equals one large batch, kill + resume equals the uninterrupted
run, the reward rises, and bad inputs are one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import crash_at_step
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "grpo.py"
TINY = REPO / "configs" / "llama" / "tiny_grpo.yaml"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "save_every_n_steps=null",
        "save_final_model=false", "batch_size=8", "num_generations=4", "max_new_tokens=6"]
FULL = ["~lora_rank", "~lora_targets", "~lora_alpha", "~lora_dropout", "optimizer.lr=1e-3"]


def records(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("extra", [[], FULL], ids=["lora", "full"])
def test_first_update_of_each_rollout_has_ratio_one_and_kl_starts_at_zero(tmp_path: Path, extra: list[str]) -> None:
    # beta > 0: LoRA's reference is the model with adapters off, full fine-tuning's a frozen copy;
    # both are the policy itself before the first update.
    history = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path}", "max_steps=3", "ppo_epochs=2",
                                             "num_minibatches=2", "beta=0.1", *extra, *FAST])
    for record in history:  # rollout log-probs = the training forward's, in fp32, every token
        assert record["first_ratio_error"] < 1e-5, record
    single = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'one'}", "max_steps=2", "ppo_epochs=1",
                                            "num_minibatches=1", "beta=0.1", "~lr_scheduler", *extra, *FAST])
    assert single[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # policy = reference at the first update
    assert single[1]["kl"] > 1e-6  # and they part once it has trained
    assert history[-1]["clip_ratio/region"] >= 0 and history[0]["entropy"] > 0


@pytest.mark.slow
def test_compiled_blocks_roll_out_and_train_with_ratio_one(tmp_path: Path) -> None:
    """`compile: true`: the rollout's prefill and decode steps and the training step run compiled
    blocks (oneDNN's linear in the rollout's, modules/onednn_linear.py), and still compute the
    numbers each other recomputes; the run equals the eager one up to compiled rounding."""
    common = ["max_steps=2", "ppo_epochs=2", "num_minibatches=2", *FAST]
    eager = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'eager'}", *common])
    compiled = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'compiled'}", "compile=true", *common])
    for record in compiled:
        assert record["first_ratio_error"] < 1e-5, record
    assert compiled[0]["reward"] == pytest.approx(eager[0]["reward"], abs=1e-6)  # same samples
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], abs=1e-4)


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    common = ["max_steps=2", "loss_type=dapo", *FAST]
    big = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'big'}", *common])
    small = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'small'}", "gradient_accumulation_steps=2",
                                           *common])
    for a, b in zip(big, small):
        for key in ("loss", "grad_norm", "reward", "kl" if "kl" in a else "entropy", "clip_ratio/region"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_a_prompt_computed_once_per_group_trains_as_each_row_whole(tmp_path: Path) -> None:
    """share_prompt_forward (the default) against every row forwarded whole: the same losses,
    gradients and so the same next rollouts, up to fp32 summation order."""
    common = ["max_steps=3", "ppo_epochs=2", "num_minibatches=2", "beta=0.1", *FAST]
    shared = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'shared'}", *common])
    whole = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path / 'whole'}", "share_prompt_forward=false", *common])
    for a, b in zip(shared, whole, strict=True):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], a["step"]
        for key in ("loss", "grad_norm", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert max(r["first_ratio_error"] for r in shared) < 1e-5


@pytest.mark.parametrize("extra", [[], ["dynamic_sampling=true", "max_resample_rounds=2"]],
                         ids=["plain", "dapo_resampling"])
def test_kill_and_resume_gives_the_uninterrupted_rewards_and_losses(tmp_path: Path, monkeypatch,
                                                                    extra: list[str]) -> None:
    common = ["max_steps=4", "ppo_epochs=1", "num_minibatches=1", *FAST, "save_every_n_steps=2", *extra]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, TINY, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 4)  # after the step-2 checkpoint and a logged step 3
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, TINY, [f"output_dir={resumed}", *common])
    assert sorted(records(resumed)) == [1, 2, 3]
    run_recipe_file(RECIPE, TINY, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    want, got = records(straight), records(resumed)
    for step in (1, 2, 3, 4):  # the same samples (generator in the checkpoint), the same updates
        for key in ("loss", "reward", "completion_length", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)
    assert len({want[s]["reward"] for s in want}) > 1  # steps really sampled different things
    if extra:  # the resampling pool's position is in the checkpoint too
        assert [got[s]["resample_rounds"] for s in got] == [want[s]["resample_rounds"] for s in want]
        assert sum(want[s]["resample_rounds"] for s in want) > 0  # it did resample


@pytest.mark.slow
def test_the_tiny_run_learns_its_format_reward(tmp_path: Path) -> None:
    """What is shown: the tiny random model cannot solve the tasks (exact match stays 0), but
    the rewarded behaviour (a reply starting with a letter or digit) rises from ~0.25 (chance)."""
    history = run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path}", "progress_bar=false", "num_threads=1",
                                             "save_every_n_steps=null", "eval_every_n_steps=null",
                                             "ppo_epochs=1", "num_minibatches=1", "max_new_tokens=4"])
    steps = [r for r in history if "loss" in r]
    mean = lambda rows: sum(r["rewards/format/mean"] for r in rows) / len(rows)  # noqa: E731
    assert mean(steps[-5:]) > mean(steps[:5]) + 0.2
    assert all(r["first_ratio_error"] < 1e-5 for r in steps)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("edit,overrides,message", [
    (None, ["batch_size=6", "num_generations=4"], "num_generations (4) does not divide batch_size (6)"),
    (("column: output", "column: solution"), [], "reward function 'exact_match' raised KeyError: 'solution'"),
    (None, ["dataset.max_prompt_len=16"], "the prompt has"),
    (None, ["num_minibatches=8", "gradient_accumulation_steps=2"], "more than the batch_size (8)"),
    (None, ["max_resample_rounds=2"], "max_resample_rounds: resampling replaces the groups dynamic_sampling"),
])
def test_bad_inputs_are_one_line(tmp_path: Path, edit: tuple[str, str] | None, overrides: list[str],
                                 message: str) -> None:
    config = TINY
    if edit is not None:  # a config whose reward function reads a column the prompts lack
        config = tmp_path / "config.yaml"
        config.write_text(TINY.read_text().replace(*edit))
    with pytest.raises(ValueError) as e:
        run_recipe_file(RECIPE, config, [f"output_dir={tmp_path / 'out'}", "max_steps=1", *FAST, *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)
