"""The distillation recipe (recipes/knowledge_distillation.py), off- and on-policy, on the tiny
configs, against independent computations: the loss function against `divergence`
of both models' full logits (values and gradients), 0 at student = teacher, kd_ratio 0 against
the SFT recipe, accumulation against one large batch, resume against an uninterrupted run,
FSDP2 against one device, the vocabulary check's one line; on-policy: the loss is the
divergence over the rollout's tokens, the teacher scores them as its own forward does."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tunewright.training.distill import KINDS, distillation_loss, divergence
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "knowledge_distillation.py"
KD, OPD = REPO / "configs" / "llama" / "tiny_kd.yaml", REPO / "configs" / "llama" / "tiny_on_policy_distill.yaml"
FAST = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", "save_every_n_steps=null",
        "save_final_model=false", "batch_size=4"]


def metrics(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _models_and_batch(num_rows: int = 4):
    from tunewright.data.collate import collate_flat, collate_padded
    from tunewright.data.sft import sft_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.training.tiny_assets import tiny_asset

    tokenizer = load_tokenizer(tiny_asset("llama"))
    data = sft_dataset(tokenizer, source=str(tiny_asset("sft")), split=f"train[:{num_rows}]")
    rows = [data[i] for i in range(num_rows)]
    student, teacher = load_pretrained(tiny_asset("llama")), load_pretrained(tiny_asset("llama_teacher")).eval()
    return student, teacher.requires_grad_(False), collate_flat(rows), collate_padded(rows, pad_id=tokenizer.pad_id)


# ---------------------------------------------------------------- the loss function
@pytest.mark.parametrize("kind", KINDS)
def test_kd_term_is_the_divergence_of_both_models_full_logits(kind: str) -> None:
    student, teacher, flat, padded = _models_and_batch()
    options = dict(kind=kind, beta=0.3, temperature=0.7)
    # reference: whole [b, s, vocab] logits of both models on the padded batch
    keep = padded["labels"] != -100
    want = divergence(student(padded["tokens"])[keep], teacher(padded["tokens"])[keep].detach(), **options).sum()
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    for chunk_size in (7, 1024):  # chunked and (one chunk) unchunked, inside the recipe's loss function
        got = distillation_loss(student, teacher, flat, kd_ratio=1.0, chunk_size=chunk_size, **options)
        grads = torch.autograd.grad(got.loss, list(student.parameters()))
        assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert got.kd.item() == pytest.approx(want.item(), rel=1e-5)
        assert got.num_targets == int(keep.sum())
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_mixed_loss_is_the_weighted_sum_of_cross_entropy_and_divergence() -> None:
    from tunewright.training.objectives import causal_lm_loss

    student, teacher, flat, _ = _models_and_batch()
    ce, n = causal_lm_loss(student, flat)
    kd = distillation_loss(student, teacher, flat, kd_ratio=1.0, kind="reverse_kl").loss
    got = distillation_loss(student, teacher, flat, kd_ratio=0.3, kind="reverse_kl")
    assert got.loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)
    assert got.ce.item() == pytest.approx(ce.item(), rel=1e-6) and got.num_targets == n
    assert torch.equal(distillation_loss(student, teacher, flat, kd_ratio=0.0).loss, ce)  # kd_ratio 0: SFT's bits


# ---------------------------------------------------------------- the recipe
def test_student_equal_to_teacher_gives_zero_kd_loss(tmp_path: Path) -> None:
    from tunewright.training.tiny_assets import tiny_asset

    history = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path}", f"teacher_model.path={tiny_asset('llama')}",
                                           "max_steps=2", "~lr_scheduler", "kd_loss=symmetric_kl", *FAST])
    assert abs(history[0]["kd_loss"]) < 1e-6  # the same weights at step 1
    assert history[1]["kd_loss"] > 1e-6  # one update later the student has moved away
    assert history[0]["loss"] == pytest.approx(0.5 * history[0]["ce_loss"], rel=1e-6)


def test_kd_ratio_zero_gives_the_sft_recipe_losses(tmp_path: Path) -> None:
    common = [*FAST, "max_steps=3", "eval_every_n_steps=3", "max_eval_batches=2"]
    sft = run_recipe_file(REPO / "recipes" / "sft.py", REPO / "configs" / "llama" / "tiny_full.yaml",
                          [f"output_dir={tmp_path / 'sft'}", *common])
    kd = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'kd'}", "kd_ratio=0.0", *common])
    assert [r["loss"] for r in kd] == [r["loss"] for r in sft]  # bit for bit
    assert [r["grad_norm"] for r in kd] == [r["grad_norm"] for r in sft]
    assert kd[-1]["val_loss"] == sft[-1]["val_loss"]  # held out too
    assert all(r["kd_loss"] > 0 for r in kd) and kd[-1]["val_kd_loss"] > 0  # still measured


def test_gradient_accumulation_2x2_equals_1x4(tmp_path: Path) -> None:
    common = ["max_steps=3", "kd_loss=generalized_jsd", "beta=0.3", *FAST]
    big = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'big'}", *common])
    small = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'small'}", *common, "batch_size=2",
                                         "gradient_accumulation_steps=2"])
    for a, b in zip(big, small):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path: Path, monkeypatch) -> None:
    common = [*FAST, "max_steps=4", "save_every_n_steps=2"]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, KD, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 4)  # after the step-2 checkpoint and a logged step 3
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, KD, [f"output_dir={resumed}", *common])
    assert sorted(metrics(resumed)) == [1, 2, 3]
    run_recipe_file(RECIPE, KD, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    for key in ("loss", "kd_loss"):
        assert metrics(resumed, key) == metrics(straight, key)  # bit-identical, every step once


@pytest.mark.parametrize("extra", [[], ["lora_rank=4", "lora_alpha=8", "optimizer.lr=1e-2"]], ids=["full", "lora"])
def test_fsdp2_in_one_process_equals_one_device(tmp_path: Path, extra: list[str]) -> None:
    common = [*FAST, "max_steps=3", *extra]
    one = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'one'}", *common])
    fsdp = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'fsdp'}", "distributed=true", *common])
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in one], rel=1e-5), key


def test_teacher_in_bf16_next_to_an_fp32_student(tmp_path: Path) -> None:
    history = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'bf16'}", "teacher_dtype=bf16", "max_steps=1",
                                           *FAST])
    fp32 = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'fp32'}", "max_steps=1", *FAST])
    assert history[0]["ce_loss"] == fp32[0]["ce_loss"]  # the student is untouched
    assert history[0]["kd_loss"] == pytest.approx(fp32[0]["kd_loss"], rel=0.05)  # the teacher rounded to bf16
    assert history[0]["kd_loss"] != fp32[0]["kd_loss"]


# ---------------------------------------------------------------- bad inputs
def _teacher_copy(tmp_path: Path, *, vocab_size: int | None = None, swap_tokens: bool = False) -> Path:
    from tunewright.training.tiny_assets import tiny_asset

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_asset("llama_teacher"), teacher)
    if vocab_size is not None:
        config = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    if swap_tokens:
        spec = json.loads((teacher / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        (teacher / "tokenizer.json").write_text(json.dumps(spec))
    return teacher


@pytest.mark.parametrize("change,message", [
    (dict(vocab_size=320), "config.json has vocab_size 320, the student's"),
    (dict(swap_tokens=True), "tokenizer.json maps 'a' to id 98, the student's"),
])
def test_teacher_of_another_vocabulary_is_one_line(tmp_path: Path, change: dict, message: str) -> None:
    teacher = _teacher_copy(tmp_path, **change)
    done = subprocess.run([sys.executable, str(RECIPE), "--config", str(KD), f"output_dir={tmp_path / 'run'}",
                           f"teacher_model.path={teacher}", *FAST], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr
    assert " parameters, " not in done.stdout  # before any weight loaded (the "model: N parameters" line)


# ---------------------------------------------------------------- learning
@pytest.mark.slow
def test_reverse_kl_to_the_teacher_falls_on_held_out_data(tmp_path: Path) -> None:
    from functools import partial

    from tunewright.models import load_pretrained
    from tunewright.training.data_setup import build_data
    from tunewright.training.entry import import_recipe, load_recipe_config
    from tunewright.training.objectives import evaluate_loss
    from tunewright.training.tiny_assets import tiny_asset

    run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path}", "kd_loss=reverse_kl", "kd_ratio=1.0", "max_steps=30",
                                 "batch_size=8", "optimizer.lr=5e-3", "eval_every_n_steps=null", "progress_bar=false",
                                 "save_final_model=true", "save_every_n_steps=null"])
    teacher = load_pretrained(tiny_asset("llama_teacher")).eval()
    _, _, val = build_data(load_recipe_config(import_recipe(RECIPE), KD, [f"output_dir={tmp_path / 'unused'}"]))

    def held_out(student: torch.nn.Module) -> float:
        term = partial(distillation_loss, teacher=teacher, kd_ratio=1.0, kind="reverse_kl")
        return evaluate_loss(student, val, lambda m, b: term(m, batch=b)[2:], device="cpu").loss.item()

    before, after = held_out(load_pretrained(tiny_asset("llama"))), held_out(load_pretrained(tmp_path / "final"))
    print(f"held-out reverse KL to the teacher: {before:.4f} -> {after:.4f} in 30 steps")
    assert after < 0.5 * before, (before, after)  # more than halved


# ---------------------------------------------------------------- on-policy distillation
def test_prompts_are_each_rows_tokens_before_its_first_target() -> None:
    from tunewright.training.distill import prompts_of

    _, _, flat, padded = _models_and_batch()
    prompts = prompts_of(flat)
    assert prompts == prompts_of(padded)
    for row, prompt in enumerate(prompts):
        tokens, labels = padded["tokens"][row], padded["labels"][row]
        assert tokens[:len(prompt)].tolist() == prompt
        # label i is token i + 1: the last prompt token predicts the first reply token, and nothing earlier counts
        assert (labels[:len(prompt) - 1] == -100).all() and labels[len(prompt) - 1] == tokens[len(prompt)]


def test_teacher_scores_the_sampled_tokens_as_its_own_forward_does() -> None:
    from tunewright.training.distill import prompts_of
    from tunewright.training.grpo import rollout_batch
    from tunewright.training.objectives import token_logprobs
    from tunewright.training.rollout import rollout

    student, teacher, flat, _ = _models_and_batch()
    out = rollout(student, prompts_of(flat), max_new_tokens=6, temperature=0.8,
                  generator=torch.Generator().manual_seed(0), vocab_size=259)
    batch = rollout_batch(out.prompts, out.completions)
    with torch.no_grad():
        teacher_logp, rows = token_logprobs(teacher, batch)
        student_logp, _ = token_logprobs(student, batch, temperature=0.8)
    want = []
    for prompt, completion in zip(out.prompts, out.completions):  # each row alone, whole logits
        tokens = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(tokens)[0, len(prompt) - 1:-1], dim=-1)
        want.append(logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1))
    torch.testing.assert_close(teacher_logp, torch.cat(want), rtol=0, atol=1e-5)
    assert rows.tolist() == [i for i, c in enumerate(out.completions) for _ in c]
    # the student's log-probs of its samples are those it sampled with: importance ratio 1
    assert (student_logp - torch.cat(out.logprobs)).abs().max() < 1e-5


def test_on_policy_loss_is_the_divergence_over_the_students_samples(tmp_path: Path, monkeypatch) -> None:
    from tunewright.models import load_pretrained
    from tunewright.training import rollout as engine
    from tunewright.training.tiny_assets import tiny_asset

    sampled = []
    real = engine.rollout

    def recording(*args, **kwargs):
        sampled.append(real(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(engine, "rollout", recording)
    # kd_ratio weighs the cross-entropy on the dataset's replies only: a sampled step learns the divergence alone
    history = run_recipe_file(RECIPE, OPD, [f"output_dir={tmp_path}", "max_steps=1", "temperature=0.9", "kd_ratio=0.5",
                                            *FAST])
    (out,) = sampled
    student, teacher = load_pretrained(tiny_asset("llama")), load_pretrained(tiny_asset("llama_teacher"))
    total, count = 0.0, 0
    for prompt, completion in zip(out.prompts, out.completions):
        tokens = torch.tensor([prompt + completion])
        at = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # the positions predicting the reply
        with torch.no_grad():
            total += divergence(student(tokens)[0, at], teacher(tokens)[0, at], kind="reverse_kl",
                                temperature=0.9).sum().item()
        count += len(completion)
    assert history[0]["on_policy"] == 1 and history[0]["num_targets"] == count
    assert history[0]["loss"] == pytest.approx(total / count, rel=1e-5) == history[0]["kd_loss"]
    assert history[0]["reply_length"] == pytest.approx(count / len(out.completions))


@pytest.mark.slow
def test_on_policy_steps_over_two_processes_run_and_resume_exactly(tmp_path: Path) -> None:
    """Each process samples its own rows (replies of different lengths: the rollout keeps the
    processes' decode steps in step) and a resumed run samples, per process, what the
    uninterrupted one did (each rank's sampling stream is kept per rank)."""
    from tests.dist_scripts.launch import torchrun

    fault = REPO / "tests" / "dist_scripts" / "recipe_with_fault.py"
    common = ["--config", OPD, *FAST, "batch_size=2", "max_steps=4", "save_every_n_steps=2", "lmbda=0.5"]
    torchrun(2, RECIPE, [*common, f"output_dir={tmp_path / 'straight'}"], timeout=600)
    stopped = torchrun(2, fault, [RECIPE, *common, f"output_dir={tmp_path / 'resumed'}"], timeout=600,
                       env={"FAULT": "raise", "FAULT_AFTER_STEPS": "3"}, expect_ok=False)
    assert stopped.returncode != 0
    torchrun(2, RECIPE, [*common, f"output_dir={tmp_path / 'resumed'}", "resume_from_checkpoint=auto"], timeout=600)
    straight = metrics(tmp_path / "straight")
    assert set(metrics(tmp_path / "straight", "on_policy").values()) == {0, 1}
    assert all(math.isfinite(v) for v in straight.values())
    assert metrics(tmp_path / "resumed") == straight


def test_on_policy_kill_and_resume_samples_what_the_uninterrupted_run_did(tmp_path: Path, monkeypatch) -> None:
    common = [*FAST, "max_steps=4", "save_every_n_steps=2", "lmbda=0.5"]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, OPD, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, OPD, [f"output_dir={resumed}", *common])
    run_recipe_file(RECIPE, OPD, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    for key in ("loss", "on_policy", "reply_length"):
        assert metrics(resumed, key) == metrics(straight, key)
    assert set(metrics(straight, "on_policy").values()) == {0, 1}  # lmbda 0.5 drew both kinds of step


def test_on_policy_fsdp2_in_one_process_equals_one_device(tmp_path: Path) -> None:
    common = [*FAST, "max_steps=2"]
    one = run_recipe_file(RECIPE, OPD, [f"output_dir={tmp_path / 'one'}", *common])
    fsdp = run_recipe_file(RECIPE, OPD, [f"output_dir={tmp_path / 'fsdp'}", "distributed=true", *common])
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], rel=1e-5)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_device(tmp_path: Path) -> None:
    from tests.test_distributed_recipes import torchrun

    common = [*FAST, "max_steps=3", "kd_loss=generalized_jsd"]
    one = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'one'}", *common])
    torchrun("knowledge_distillation", "tiny_kd", [f"output_dir={tmp_path / 'two'}", *common, "batch_size=2"])
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert metrics(tmp_path / "two", key) == pytest.approx({r["step"]: r[key] for r in one}, rel=1e-5), key
