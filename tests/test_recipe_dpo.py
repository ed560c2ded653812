"""The preference recipe (recipes/dpo.py) on the tiny configs: the reference policies against
independent computations (the base model loaded alone, a live pass), accumulation against one
large batch, resume against an uninterrupted run, every loss at its formula's starting value,
FSDP2 on 2 processes against one (slow tier), and the bad inputs' one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "dpo.py"
LORA, FULL = REPO / "configs" / "llama" / "tiny_dpo_lora.yaml", REPO / "configs" / "llama" / "tiny_dpo_full.yaml"
KTO = REPO / "configs" / "llama" / "tiny_kto_lora.yaml"
FAST = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", "save_every_n_steps=null",
        "save_final_model=false"]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _pairs(n: int = 6):
    from tunewright.data.preference import collate_pairs, preference_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.training.tiny_assets import tiny_asset

    tokenizer = load_tokenizer(tiny_asset("llama"))
    dataset = preference_dataset(tokenizer, source=str(tiny_asset("pairs")), split=f"train[:{n}]")
    return dataset, collate_pairs([dataset[i] for i in range(n)], pad_id=tokenizer.pad_id)


# ---------------------------------------------------------------- references
def test_lora_reference_is_exactly_the_base_model_loaded_alone() -> None:
    from tunewright.models import load_pretrained
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.training.objectives import sequence_logprobs
    from tunewright.training.reference import Reference
    from tunewright.training.tiny_assets import tiny_asset

    _, batch = _pairs()
    policy = load_pretrained(tiny_asset("llama"))
    apply_lora(policy, targets="all-linear", rank=4)
    with torch.no_grad():  # trained-looking adapters: the policy now differs from its base
        for name, param in policy.named_parameters():
            if "lora_b" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    base = load_pretrained(tiny_asset("llama"))
    with torch.no_grad():
        want, _ = sequence_logprobs(base, batch)
        adapted, _ = sequence_logprobs(policy, batch)
    got = Reference.adapters_off(policy).logps(batch)
    assert torch.equal(got, want)
    assert (adapted - want).abs().max() > 1e-3  # the adapters were on, and are back on
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_precomputed_reference_equals_the_live_one(tmp_path: Path) -> None:
    from functools import partial

    from tunewright.data.preference import collate_pairs
    from tunewright.data.sampler import ResumableSampler
    from tunewright.models import load_pretrained
    from tunewright.training.batching import Batches
    from tunewright.training.reference import Reference, precompute, with_reference
    from tunewright.training.tiny_assets import tiny_asset

    dataset, _ = _pairs(10)
    model = load_pretrained(tiny_asset("llama"))
    live = Reference.of(model)
    batches = Batches(dataset, ResumableSampler(len(dataset), shuffle=False), 4, partial(collate_pairs, pad_id=256))
    table = precompute(live, batches, device=torch.device("cpu"), cache_dir=tmp_path, split="train", key="k")
    with_reference(batches, table)
    reference = Reference.precomputed()
    for batch in batches.first_epoch():
        assert torch.equal(reference.logps(batch), live.logps(batch))
    # the cache is read back, not recomputed, for the same key; another key recomputes
    again = precompute(Reference(lambda b: 1 / 0), batches, device=torch.device("cpu"), cache_dir=tmp_path,
                       split="train", key="k")
    assert torch.equal(again, table)
    with pytest.raises(ZeroDivisionError):
        precompute(Reference(lambda b: 1 / 0), batches, device=torch.device("cpu"), cache_dir=tmp_path,
                   split="train", key="other")


# ---------------------------------------------------------------- the recipe
@pytest.mark.parametrize("loss,first", [("dpo", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_reference_losses_start_at_their_formula_value(tmp_path: Path, loss: str, first: float) -> None:
    # LoRA starts with B = 0: the policy IS the reference at step 1
    history = run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path}", f"loss={loss}", "max_steps=1", *FAST])
    assert history[0]["loss"] == pytest.approx(first, abs=1e-6)
    assert history[0]["margin"] == 0.0


@pytest.mark.parametrize("config,extra", [(LORA, ["loss=simpo", "beta=2.0"]), (LORA, ["loss=orpo", "beta=2.0"]),
                                          (KTO, []), (FULL, ["precompute_ref_logps=true"])])
def test_every_loss_learns(tmp_path: Path, config: Path, extra: list[str]) -> None:
    history = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}", "max_steps=12", "~lr_scheduler", *extra,
                                               *FAST])
    first, last = history[:3], history[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "margin") > mean(first, "margin")


def test_gradient_accumulation_2x2_equals_1x4(tmp_path: Path) -> None:
    common = ["max_steps=4", "~lr_scheduler", *FAST]
    big = run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'big'}", "batch_size=4", *common])
    small = run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'small'}", "batch_size=2",
                                           "gradient_accumulation_steps=2", *common])
    for a, b in zip(big, small):
        for key in ("loss", "grad_norm", "margin", "accuracy", "logps/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert [r["num_pairs"] for r in small] == [4] * 4


@pytest.mark.parametrize("config,extra", [(LORA, []), (FULL, ["precompute_ref_logps=true"])])
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path: Path, monkeypatch, capsys, config: Path,
                                                         extra: list[str]) -> None:
    common = ["max_steps=6", "save_every_n_steps=3", "eval_every_n_steps=null", "progress_bar=false",
              "num_threads=1", "save_final_model=false", *extra]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, config, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)  # after the step-3 checkpoint and a logged step 4
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, config, [f"output_dir={resumed}", *common])
    assert sorted(losses(resumed)) == [1, 2, 3, 4]
    capsys.readouterr()
    run_recipe_file(RECIPE, config, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    assert losses(resumed) == losses(straight)  # bit-identical, every step once
    if extra:  # the reference log-probs came from the cache, not a second pass
        assert "reference log-probs: read from" in capsys.readouterr().out


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("config,overrides,message", [
    (LORA, ["loss=kto"], "loss: kto trains on unpaired examples"),
    (KTO, ["loss=dpo"], "loss: dpo trains on pairs"),
    (LORA, ["loss=simpo", "precompute_ref_logps=true"], "precompute_ref_logps: loss simpo uses no reference"),
    (FULL, ["loss=kto", "precompute_ref_logps=true"], "precompute_ref_logps: kto forms its KL rows"),
    (LORA, ["loss=sigmoid"], "loss"),
    (LORA, ["loss=orpo", "rpo_alpha=1.0"], "rpo_alpha: loss orpo has its own SFT term"),
    (LORA, ["rpo_alpha=-1"], "rpo_alpha"),
])
def test_bad_config_is_one_line(tmp_path: Path, config: Path, overrides: list[str], message: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(RECIPE), "--config", str(config), f"output_dir={tmp_path}",
                           *overrides, *FAST], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2  # a user error: one `error:` line (training/entry.py)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


# ---------------------------------------------------------------- FSDP2
@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [("tiny_dpo_lora", []), ("tiny_dpo_full", [])])
def test_fsdp2_two_processes_equal_one_device(tmp_path: Path, config: str, extra: list[str]) -> None:
    from tests.test_distributed_recipes import torchrun

    common = ["max_steps=4", *FAST, *extra]
    single = run_recipe_file(RECIPE, REPO / "configs" / "llama" / f"{config}.yaml",
                             [f"output_dir={tmp_path / 'one'}", "batch_size=4", *common])
    torchrun("dpo", config, [f"output_dir={tmp_path / 'two'}", "batch_size=2", *common])
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm", "margin"):
        two = {r["step"]: r[key] for r in rows if key in r}
        assert two == pytest.approx({r["step"]: r[key] for r in single}, rel=1e-5, abs=1e-7), key
