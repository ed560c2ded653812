"""The teacher's top-k cached to disk (`teacher_top_k`, training/teacher_cache.py) against
independent computations: the cached divergence against a formula written here from the
teacher's whole logits truncated to its top k plus one "rest" outcome (values and gradients,
through a cache written and read back from disk); with top_k = the vocabulary the cached epoch
2 equals the live teacher's; the teacher does not run in epoch 2; kill + `auto` resume exact;
another run's cache refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tests.test_recipe_kd import _models_and_batch, metrics
from tunewright.training.distill import KINDS, distillation_loss
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "knowledge_distillation.py"
KD = REPO / "configs" / "llama" / "tiny_kd.yaml"
# 8 rows in 2 steps of 4: every epoch sees every row, so epoch 1 caches what epoch 2 reads
FAST = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", "save_every_n_steps=null",
        "save_final_model=false", "batch_size=4", "dataset.split=train[:8]", "~val_dataset", "max_steps=null",
        "epochs=2", "~lr_scheduler"]


def _vocab_size() -> int:
    from tunewright.training.tiny_assets import tiny_asset

    return json.loads((tiny_asset("llama_teacher") / "config.json").read_text())["vocab_size"]


# ---------------------------------------------------------------- the divergence read from the cache
def _reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int, kind: str, beta: float,
               temperature: float) -> torch.Tensor:
    """Σ over positions of the divergence between P and Q over k + 1 outcomes: the teacher's k
    most likely ids, then all other ids together. P from the teacher's softmax at
    `temperature`, Q from the student's (float64)."""
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    top = teacher_logits.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, top), q.gather(-1, top)
    P = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    m = beta * P + (1 - beta) * Q
    value = {"forward_kl": kl(P, Q), "reverse_kl": kl(Q, P), "symmetric_kl": (kl(P, Q) + kl(Q, P)) / 2,
             "generalized_jsd": beta * kl(P, m) + (1 - beta) * kl(Q, m)}[kind]
    return value.sum()


def test_cached_divergence_is_the_top_k_plus_rest_formula(tmp_path: Path) -> None:
    from tunewright.training.teacher_cache import TeacherCache

    student, teacher, flat, padded = _models_and_batch()
    k, identity = 5, {"teacher": "t"}
    flat = {**flat, "example_ids": [3, 0, 2, 1],
            "example_targets": (padded["labels"] != -100).sum(1).tolist()}
    writer = TeacherCache(tmp_path, identity=identity, top_k=k, temperature=0.7)
    live = writer.teacher_options(flat, "cpu")
    assert "on_teacher_logits" in live  # nothing cached yet: the teacher runs and its rows are kept
    distillation_loss(student, teacher, flat, kd_ratio=1.0, chunk_size=7, temperature=0.7, **live)
    writer.flush()

    reader = TeacherCache(tmp_path, identity=identity, top_k=k, temperature=0.7)  # from disk alone
    shuffled = {"example_ids": [1, 2, 0, 3], "example_targets": flat["example_targets"][::-1]}
    assert reader.teacher_options({**padded, **shuffled}, "cpu")["teacher_top_k"].ids.shape[1] == k
    cached = reader.teacher_options(flat, "cpu")
    keep = padded["labels"] != -100
    for kind in KINDS:
        options = dict(kind=kind, beta=0.3, temperature=0.7)
        got = distillation_loss(student, teacher, flat, kd_ratio=1.0, chunk_size=7, **cached, **options)
        want = _reference(student(padded["tokens"])[keep], teacher(padded["tokens"])[keep].detach(), k=k, **options)
        assert got.kd.item() == pytest.approx(want.item(), rel=1e-5), kind
        for a, b in zip(torch.autograd.grad(got.loss, list(student.parameters())),
                        torch.autograd.grad(want, list(student.parameters()))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the recipe
def _count_teacher_forwards(monkeypatch) -> list[str]:
    """Which model each forward of a recipe step is ('teacher': frozen weights), in order."""
    from tunewright.training import objectives

    calls: list[str] = []
    real = objectives.hidden_states

    def counted(model, batch, **kwargs):
        calls.append("student" if any(p.requires_grad for p in model.parameters()) else "teacher")
        return real(model, batch, **kwargs)

    monkeypatch.setattr(objectives, "hidden_states", counted)
    return calls


def test_top_k_of_the_whole_vocabulary_gives_the_live_teachers_losses_without_running_it(tmp_path: Path,
                                                                                           monkeypatch) -> None:
    common = [*FAST, "kd_loss=generalized_jsd", "beta=0.3", "temperature=2.0"]
    live = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'live'}", *common])
    calls = _count_teacher_forwards(monkeypatch)
    cached = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'cached'}", f"teacher_top_k={_vocab_size()}",
                                          *common])
    assert len(live) == len(cached) == 4
    # 2 steps of 4 rows: the teacher runs in epoch 1 only
    assert calls == ["teacher", "student", "teacher", "student", "student", "student"]
    for a, b in zip(live, cached):
        for key in ("loss", "kd_loss", "grad_norm"):
            if b["epoch"] == 0:
                assert a[key] == b[key], (a["step"], key)  # epoch 1 is the live run, bit for bit
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert sorted(p.name for p in (tmp_path / "cached" / "teacher_cache").iterdir()) == [
        "manifest.json", "rank0-000000.safetensors"]


def test_kill_and_resume_with_the_cache_gives_the_uninterrupted_losses(tmp_path: Path, monkeypatch) -> None:
    common = [*FAST, "teacher_top_k=8", "save_every_n_steps=1"]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, KD, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 2)  # after the step-1 checkpoint: step 2's rows are not on disk
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, KD, [f"output_dir={resumed}", *common])
    calls = _count_teacher_forwards(monkeypatch)
    run_recipe_file(RECIPE, KD, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    assert calls == ["teacher", "student", "student", "student"]  # step 2 again, then epoch 2 from the cache
    for key in ("loss", "kd_loss", "grad_norm"):
        assert metrics(resumed, key) == metrics(straight, key)  # bit-identical, every step once


def test_a_cache_of_another_temperature_is_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'first'}", f"teacher_cache_dir={cache}",
                                 "teacher_top_k=8", *FAST, "epochs=1", "max_steps=1"])
    done = subprocess.run([sys.executable, str(RECIPE), "--config", str(KD), f"output_dir={tmp_path / 'second'}",
                           f"teacher_cache_dir={cache}", "teacher_top_k=8", "temperature=2.0", *FAST],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert f"teacher_cache_dir: {cache / 'manifest.json'} was written with temperature 1.0, this run has 2.0" \
        in lines[0]
    assert " parameters" not in done.stdout  # before any model was built


def test_fsdp2_in_one_process_with_the_cache_equals_one_device(tmp_path: Path) -> None:
    common = [*FAST, "teacher_top_k=8"]
    one = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'one'}", *common])
    fsdp = run_recipe_file(RECIPE, KD, [f"output_dir={tmp_path / 'fsdp'}", "distributed=true", *common])
    for key in ("loss", "kd_loss", "grad_norm"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert (tmp_path / "fsdp" / "teacher_cache" / "rank0-000000.safetensors").is_file()


@pytest.mark.parametrize("change", ["teacher", "top_k"])
def test_a_cache_of_another_teacher_or_top_k_is_one_line(tmp_path: Path, change: str) -> None:
    import shutil

    from tunewright.training.teacher_cache import TeacherCache, model_identity
    from tunewright.training.tiny_assets import tiny_asset

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_asset("llama_teacher"), teacher)
    node = {"_component_": "tunewright.models.load_pretrained", "path": str(teacher)}
    TeacherCache(tmp_path / "cache", identity={"teacher": model_identity(node)}, top_k=8, temperature=1.0)
    top_k = 8
    if change == "teacher":  # the same path, retrained: another config.json
        config = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    else:
        top_k = 16
    with pytest.raises(ValueError) as error:
        TeacherCache(tmp_path / "cache", identity={"teacher": model_identity(node)}, top_k=top_k, temperature=1.0)
    message = str(error.value)
    assert "\n" not in message and f"teacher_cache_dir: {tmp_path / 'cache' / 'manifest.json'} was written with " \
        f"{change} " in message and "delete" in message
