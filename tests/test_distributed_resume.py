"""The distributed recipes resume exactly: after one rank is SIGKILLed, on another number of
processes, and launched as two "nodes" on one machine.

Reference: the per-step losses of an uninterrupted 2-process run (2 x batch 2) of the tiny full
config, fp32 over gloo; runs on 1 process use batch 4 (the same global batch), so they differ
from it only by summation order: tolerance 1e-5 relative.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.dist_scripts.launch import (assert_resumed_at, finish, free_port, losses, metric_lines,
                                       start, torchrun, torchrun_cmd, wait_for_file)
from tunewright.training.checkpointing import step_dirs

REPO = Path(__file__).resolve().parent.parent
FULL = REPO / "recipes" / "sft.py"
FULL_CONFIG = REPO / "configs" / "llama" / "tiny_full_distributed.yaml"
LORA = REPO / "recipes" / "sft.py"
LORA_CONFIG = REPO / "configs" / "llama" / "tiny_lora_distributed.yaml"
FAULT = REPO / "tests" / "dist_scripts" / "recipe_with_fault.py"
STEPS = 8
COMMON = [f"max_steps={STEPS}", "save_every_n_steps=2", "eval_every_n_steps=null",
          "progress_bar=false", "num_threads=1", "save_final_model=false"]


def full_args(out: Path, nproc: int, *extra: str) -> list[str]:
    # the same global batch of 4 on any number of processes
    return ["--config", FULL_CONFIG, f"output_dir={out}", f"batch_size={4 // nproc}", *COMMON, *extra]


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference")
    torchrun(2, FULL, full_args(out, 2))
    return losses(out)


@pytest.mark.slow
def test_sigkill_one_rank_then_resume_on_2_and_on_1_process(tmp_path, reference):
    out = tmp_path / "killed"
    out.mkdir()
    fault = {"FAULT": "hang", "FAULT_AFTER_STEPS": "5", "FAULT_RANK": "1"}
    proc = start(torchrun_cmd(2, FAULT, [FULL, *full_args(out, 2)]), tmp_path / "killed.log", env=fault)
    pid = int(wait_for_file(out / "hang.pid", proc, timeout=240))
    os.kill(pid, signal.SIGKILL)  # rank 1 dies in step 6; rank 0 waits in that step's all-reduce
    returncode, output = finish(proc, timeout=120)
    assert returncode != 0, output
    assert [s for s, _ in step_dirs(out)] == [2, 4]
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    on_one = tmp_path / "on_one"
    shutil.copytree(out, on_one)
    before = metric_lines(out)

    torchrun(2, FULL, full_args(out, 2, "resume_from_checkpoint=auto"))
    assert_resumed_at(out, before, 4)
    assert_same_losses(losses(out), reference)
    torchrun(1, FULL, full_args(on_one, 1, "resume_from_checkpoint=auto"))  # 2 x 2 -> 1 x 4
    assert_resumed_at(on_one, before, 4)
    assert_same_losses(losses(on_one), reference)


@pytest.mark.slow
def test_a_1_process_checkpoint_resumes_on_2(tmp_path, reference):
    out = tmp_path / "run"
    stop = {"FAULT": "raise", "FAULT_AFTER_STEPS": "3"}
    proc = torchrun(1, FAULT, [FULL, *full_args(out, 1)], env=stop, expect_ok=False)
    assert proc.returncode != 0 and [s for s, _ in step_dirs(out)] == [2]
    before = metric_lines(out)
    torchrun(2, FULL, full_args(out, 2, "resume_from_checkpoint=auto", "async_checkpoint=true"))
    assert_resumed_at(out, before, 2)
    assert_same_losses(losses(out), reference)
    assert [s for s, _ in step_dirs(out)] == [6, 8]


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_like_one_launch(tmp_path, reference):
    out = tmp_path / "two_nodes"
    port = free_port()
    launches = []
    for node_rank in (0, 1):
        launcher = ["--nnodes", "2", "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "tunewright-test"]
        cmd = torchrun_cmd(1, FULL, full_args(out, 2), launcher=launcher)
        launches.append(start(cmd, tmp_path / f"node{node_rank}.log"))
    for proc in launches:
        returncode, output = finish(proc, timeout=300)
        assert returncode == 0, output
    assert_same_losses(losses(out), reference)


@pytest.mark.slow
def test_lora_checkpoints_hold_adapters_and_their_peft_export_and_resume(tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    straight = tmp_path / "straight"
    common = ["--config", LORA_CONFIG, "max_steps=4", "save_every_n_steps=2", "eval_every_n_steps=null",
              "progress_bar=false", "num_threads=1", "save_final_model=false", "save_adapter=false"]
    torchrun(2, LORA, [*common, f"output_dir={straight}", "batch_size=2"])
    step2 = straight / "checkpoints" / "step_000002"
    metadata = FileSystemReader(str(step2 / "dcp")).read_metadata().state_dict_metadata
    weights = {k for k in metadata if k.startswith("model.model.")}
    assert weights and all(".lora_a." in k or ".lora_b." in k for k in weights), sorted(weights)[:4]
    # the PEFT adapter of that step, gathered by every rank and written by rank 0
    adapter = load_file(str(step2 / "adapter_model.safetensors"))
    assert len(adapter) == len(weights) and all("lora_A" in k or "lora_B" in k for k in adapter)

    resumed = tmp_path / "resumed"  # from step 2 of the 2-process run, on 1 process
    torchrun(1, LORA, [*common, f"output_dir={resumed}", "batch_size=4",
                       f"resume_from_checkpoint={step2}"])
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
