"""Options of the distributed recipes not covered by test_distributed_recipes / _resume:
optimizer in backward (against the single-device recipe, and its sharded resume), tensor parallel
resume from DCP, per-block compile, and activation offloading + checkpointing with LoRA.

References: fp32 on CPU over gloo; 2 processes x batch 2 against 1 x batch 4 (the same global
batch) differ only by summation order (rel 1e-5); a resume on the same world size repeats the
uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.dist_scripts.launch import assert_resumed_at, losses, metric_lines, torchrun
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPES, CONFIGS = REPO / "recipes", REPO / "configs" / "llama"
FULL, FULL_CONFIG = RECIPES / "sft.py", CONFIGS / "tiny_full_distributed.yaml"
LORA, LORA_CONFIG = RECIPES / "sft.py", CONFIGS / "tiny_lora_distributed.yaml"
STEPS = 4
COMMON = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", f"max_steps={STEPS}",
          "save_final_model=false"]
OPTIM_IN_BACKWARD = ["optimizer_in_backward=true", "clip_grad_norm=null", "gradient_accumulation_steps=1"]


def assert_close_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(want) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, rel=1e-5)


def straight_then_resumed(tmp_path: Path, script: Path, nproc: int, args: list[str]) -> tuple[dict, dict]:
    """Losses of an uninterrupted run saving every 2 steps, and of a copy of it resumed from its
    step-2 checkpoint (as if it had stopped there)."""
    straight = tmp_path / "straight"
    torchrun(nproc, script, [*args, f"output_dir={straight}", "save_every_n_steps=2"])
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:06d}")
    before = metric_lines(resumed)
    torchrun(nproc, script, [*args, f"output_dir={resumed}", "save_every_n_steps=2",
                             "resume_from_checkpoint=auto"])
    assert_resumed_at(resumed, before, 2)
    return losses(straight), losses(resumed)


# ---------------------------------------------------------------- optimizer in backward
@pytest.mark.slow
def test_optimizer_in_backward_equals_one_device_and_resumes_exactly(tmp_path):
    single = tmp_path / "single"
    run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_full.yaml",
                    [f"output_dir={single}", "batch_size=4", "save_every_n_steps=null", *COMMON,
                     *OPTIM_IN_BACKWARD])
    args = ["--config", FULL_CONFIG, "batch_size=2", *COMMON, *OPTIM_IN_BACKWARD]
    straight, resumed = straight_then_resumed(tmp_path, FULL, 2, args)
    assert_close_losses(straight, losses(single))
    # The per-parameter optimizers' sharded state came back: the resumed steps repeat exactly.
    assert resumed == straight


# ---------------------------------------------------------------- tensor parallel + DCP resume
@pytest.mark.slow
def test_tensor_parallel_resumes_exactly_from_sharded_checkpoint(tmp_path):
    # tp=2, dp=1: both ranks see the whole batch of 4; weights and Adam moments are TP DTensors.
    args = ["--config", FULL_CONFIG, "batch_size=4", "tensor_parallel_dim=2", *COMMON]
    straight, resumed = straight_then_resumed(tmp_path, FULL, 2, args)
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert resumed == straight


# ---------------------------------------------------------------- per-block compile
@pytest.mark.slow
def test_compile_on_one_process_gives_the_same_losses(tmp_path):
    def run(out: Path, *extra: str) -> dict[int, float]:
        run_recipe_file(FULL, FULL_CONFIG, [f"output_dir={out}", "batch_size=4", "save_every_n_steps=null",
                                            *COMMON, *extra])
        return losses(out)

    from torch._dynamo.utils import counters

    eager = run(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = run(tmp_path / "compiled", "compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did compile (under FSDP2)
    torch._dynamo.reset()
    assert_close_losses(compiled, eager)
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- activation offloading
@pytest.mark.slow
def test_lora_offloading_with_checkpointing_gives_the_same_losses(tmp_path):
    args = ["--config", LORA_CONFIG, "batch_size=2", "save_every_n_steps=null", "save_adapter=false", *COMMON]
    plain, both = tmp_path / "plain", tmp_path / "both"
    torchrun(2, LORA, [*args, f"output_dir={plain}"])
    torchrun(2, LORA, [*args, f"output_dir={both}", "enable_activation_offloading=true",
                       "enable_activation_checkpointing=true"])
    assert_close_losses(losses(both), losses(plain))
