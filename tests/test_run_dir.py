"""One run per output directory (`training/run_dir.py`), resume past damage, config changes on
resume, a full disk, file modes, and what a run prints outside a terminal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bad_inputs.harness import assert_one_error_line, run_tune
from tunewright.training.atomic import DiskFullError
from tunewright.training.entry import run_recipe_file
from tunewright.training.run import Run

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft.py"
LORA = REPO / "configs" / "llama" / "tiny_lora.yaml"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "save_final_model=false"]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


# ------------------------------------------------------------------ the lock
HOLD = """
import sys, time
from tunewright.training.run import Run
run = Run(sys.argv[1], progress_bar=False)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_while_the_first_lives_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO.parent)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ValueError, match=rf"another run is writing there \(process {holder.pid} on "):
            Run(tmp_path, progress_bar=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of any kind
        holder.wait()
    run = Run(tmp_path, progress_bar=False)  # the kernel dropped the dead process's lock
    run.close()
    assert f"the run that held it (process {holder.pid} " in capsys.readouterr().out
    assert (tmp_path / ".tunewright.lock").read_text() == ""  # released: no holder named


def test_the_lock_is_released_by_close_and_reclaimed_from_an_abandoned_run_of_this_process(tmp_path, capsys):
    abandoned = Run(tmp_path, progress_bar=False)  # e.g. a notebook cell that raised
    Run(tmp_path, progress_bar=False).close()
    assert "ended without releasing" not in capsys.readouterr().out
    del abandoned


# ------------------------------------------------------------------ temporaries
def test_temporaries_of_a_killed_run_are_removed_and_a_half_swapped_checkpoint_put_back(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".step_000004.tmp-1a2b3c4d").mkdir(parents=True)  # atomic_dir, killed while writing
    (ckpt / ".step_000004.tmp").mkdir()  # DCP's temporary
    (ckpt / ".step_000002.old-0badc0de").mkdir()  # killed between the two renames: the old step 2
    torch.save({"run": {"step": 2}}, ckpt / ".step_000002.old-0badc0de" / "train_state.pt")
    (tmp_path / ".final.tmp-deadbeef").mkdir()
    (tmp_path / ".config.yaml.tmp-00112233").write_text("half")
    keep = [tmp_path / ".notes.tmp-xyz", tmp_path / "final.tmp-00112233", ckpt / "my_step_backup"]
    for path in keep:
        path.write_text("user's") if "." in path.name else path.mkdir()
    run = Run(tmp_path, progress_bar=False, resume_from_checkpoint="auto")
    run.close()
    assert sorted(p.name for p in ckpt.iterdir()) == ["my_step_backup", "step_000002"]
    assert torch.load(ckpt / "step_000002" / "train_state.pt", weights_only=True) == {"run": {"step": 2}}
    assert all(p.exists() for p in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".notes.tmp-xyz", ".tunewright.lock", "checkpoints", "final.tmp-00112233"])
    assert "removed 4 unfinished write(s) left by an interrupted run" in capsys.readouterr().out


# ------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 6-step LoRA run with checkpoints at 2, 4, 6: the reference."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_recipe_file(RECIPE, LORA, [f"output_dir={out}", *FAST, "max_steps=6", "save_every_n_steps=2",
                                   "keep_last_n_checkpoints=null"])
    return out


def _interrupted_copy(straight: Path, tmp_path: Path) -> Path:
    """The straight run as if killed after its step-4 checkpoint (steps 5-6 never happened)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / "step_000006")
    shutil.rmtree(out / "adapter")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 4))
    return out


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_auto_falls_back_past_a_damaged_latest_checkpoint(straight, tmp_path, capsys, damage):
    out = _interrupted_copy(straight, tmp_path)
    latest = out / "checkpoints" / "step_000004"
    if damage == "truncated":  # a cheap check finds it before anything loads
        weights = latest / "model.trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    else:  # found when loading fails
        (latest / "optimizer.pt").unlink()
    run_recipe_file(RECIPE, LORA, [f"output_dir={out}", *FAST, "max_steps=6", "save_every_n_steps=2",
                                   "keep_last_n_checkpoints=null", "resume_from_checkpoint=auto"])
    printed = capsys.readouterr().out
    assert f"resuming from step 2 of {out / 'checkpoints' / 'step_000002'}" in printed
    assert "step_000004" in printed and "falling back" in printed
    assert losses(out) == losses(straight)  # steps 3-6 again, as the uninterrupted run took them
    assert (out / "checkpoints" / "step_000004.damaged").is_dir()  # set aside, not deleted


def test_a_sharded_checkpoint_with_a_truncated_or_missing_shard_is_passed_over(tmp_path, capsys):
    from tunewright.training.checkpointing import checkpoint_damage
    from tunewright.training.dcp_checkpoint import ShardedCheckpointer
    from tunewright.training.state import TrainState

    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    run = Run(tmp_path, progress_bar=False, checkpointer=ShardedCheckpointer(), keep_last_n_checkpoints=None)
    for _ in run.steps(3):
        run.save(TrainState(model=model, optimizer=optimizer))
    run.close()
    steps = tmp_path / "checkpoints"
    shard = next((steps / "step_000003" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-4])
    assert "is truncated" in checkpoint_damage(steps / "step_000003")
    next((steps / "step_000002" / "dcp").glob("*.distcp")).unlink()
    assert "is missing" in checkpoint_damage(steps / "step_000002")
    assert checkpoint_damage(steps / "step_000001") is None
    again = Run(tmp_path, progress_bar=False, checkpointer=ShardedCheckpointer(), resume_from_checkpoint="auto")
    assert again.resume(TrainState(model=model, optimizer=optimizer)) == 1
    again.close()
    printed = capsys.readouterr().out
    assert "step_000003 is damaged" in printed and "step_000002 is damaged" in printed
    assert sorted(p.name for p in steps.iterdir()) == ["step_000001", "step_000002.damaged", "step_000003.damaged"]


def test_resume_applies_a_longer_run_and_says_so(straight, tmp_path, capsys):
    out = _interrupted_copy(straight, tmp_path)
    run_recipe_file(RECIPE, LORA, [f"output_dir={out}", *FAST, "max_steps=8", "save_every_n_steps=2",
                                   "keep_last_n_checkpoints=null", "resume_from_checkpoint=auto",
                                   "log_every_n_steps=2"])
    printed = capsys.readouterr().out
    assert "resuming with changes that apply from here on: log_every_n_steps 1 -> 2; max_steps 6 -> 8" in printed
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6, 8]  # step 5: the first this process ran


def test_a_checkpoint_without_a_fingerprint_names_the_tensor_and_the_key(straight, tmp_path):
    out = _interrupted_copy(straight, tmp_path)
    for state_file in (out / "checkpoints").glob("step_*/train_state.pt"):
        saved = torch.load(state_file, weights_only=True)
        del saved["run"]["config"]  # as written before fingerprints existed
        torch.save(saved, state_file)
    with pytest.raises(ValueError, match=r"step_000004: checkpoint tensor 'layers\.0\.\S*lora_a\.weight' of model "
                                         r"'model' has shape \(8, \d+\), the model has \(4, \d+\): lora_rank"):
        run_recipe_file(RECIPE, LORA, [f"output_dir={out}", *FAST, "max_steps=6", "resume_from_checkpoint=auto",
                                       "lora_rank=4"])


def test_overwrite_output_dir_deletes_only_what_the_earlier_run_wrote(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "my_backup").mkdir()
    run_recipe_file(RECIPE, LORA, [f"output_dir={out}", *FAST, "max_steps=1", "overwrite_output_dir=true"])
    assert "deleted the earlier run's checkpoints up to step 6, metrics.jsonl, adapter" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "my_backup").is_dir()
    assert sorted(losses(out)) == [1] and not list((out / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only): writes there really run out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("when", ["checked before writing", "while writing"])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resume_works_once_freed(small_disk, monkeypatch, when):
    out = small_disk / "run"
    common = [f"output_dir={out}", *FAST, "max_steps=4", "save_every_n_steps=2", "save_adapter=false"]
    first = run_tune(["run", "sft", "--config", "llama/tiny_lora", *common, "max_steps=2"], cwd=small_disk)
    assert first.code == 0, first.err
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 100_000))  # 100 KB left
    if when == "while writing":  # the free-space check passes; the write itself hits ENOSPC
        monkeypatch.setattr("tunewright.training.atomic.check_free_space", lambda where, need: None)
    result = run_tune(["run", "sft", "--config", "llama/tiny_lora", *common, "resume_from_checkpoint=auto"],
                      cwd=small_disk)
    line = assert_one_error_line(result, [str(out / "checkpoints" / "step_000004"), "no space left on device",
                                          "KB free"])
    if when == "checked before writing":
        assert "needs about" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]  # no temporary left
    filler.unlink()
    again = run_tune(["run", "sft", "--config", "llama/tiny_lora", *common, "resume_from_checkpoint=auto"],
                     cwd=small_disk)
    assert again.code == 0, again.err
    assert "resuming from step 2" in again.out and sorted(losses(out)) == [1, 2, 3, 4]


@pytest.mark.parametrize("when", ["checked before writing", "while writing"])
def test_a_sharded_checkpoint_on_a_full_disk_is_one_error_and_leaves_no_temporary(small_disk, monkeypatch, when):
    from tunewright.training.dcp_checkpoint import ShardedCheckpointer
    from tunewright.training.state import TrainState

    model = torch.nn.Linear(512, 512)  # 1 MB of weights, 2 MB more of AdamW state once stepped
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 512)).sum().backward()
    optimizer.step()
    if when == "while writing":
        monkeypatch.setattr("tunewright.training.dcp_checkpoint.check_free_space", lambda where, need: None)
    run = Run(small_disk / "run", progress_bar=False, checkpointer=ShardedCheckpointer())
    with pytest.raises(DiskFullError, match=r"step_000001: no space left on device \(needs about 3\.0 MB, "):
        for _ in run.steps(1):
            run.save(TrainState(model=model, optimizer=optimizer))
    run.close()
    assert not list((small_disk / "run").glob("checkpoints/*"))  # not even a temporary


def test_disk_full_error_is_a_user_error_everywhere():
    assert issubclass(DiskFullError, OSError) and issubclass(DiskFullError, ValueError)


# ------------------------------------------------------------------ file modes, start line
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_weights_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path}", *FAST, "max_steps=1", "save_every_n_steps=1",
                                       "save_final_model=true"])
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".tunewright.lock"]
    assert any(p.suffix == ".safetensors" for p in written)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}


def test_outside_a_terminal_a_start_line_and_the_first_step_show_at_once(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "tune"), "run", "sft", "--config", "llama/tiny_full",
                           f"output_dir={tmp_path}", "num_threads=1", "eval_every_n_steps=null", "max_steps=3",
                           "log_every_n_steps=10"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("sft on cpu: 3 steps, writing to "))
    steps = [x.split(" |")[0] for x in lines if x.startswith("step ")]
    assert steps == ["step 1", "step 3"] and lines.index(next(x for x in lines if x.startswith("step 1 "))) > start
