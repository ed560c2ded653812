"""Collectives take tensors on the model's device: a CPU tensor in a collective of a GPU run is
caught on any backend (gloo takes CPU tensors, NCCL does not), and the SFT loop's collectives
all run on the placement's device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from tunewright.training import distributed as dist

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_process_group():
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    yield
    dist.set_collective_device(None)
    torch_dist.destroy_process_group()


def test_a_cpu_tensor_in_a_collective_of_a_gpu_run_fails_loudly_on_gloo(one_process_group):
    dist.set_collective_device("cuda")  # what a GPU run's placement registers
    with pytest.raises(RuntimeError, match="a collective got a tensor on cpu in a run on cuda"):
        dist.all_reduce_sum(torch.ones(2))
    dist.set_collective_device("cpu")
    assert dist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def test_the_sft_loops_collectives_run_on_the_placements_device(tmp_path, monkeypatch):
    from tunewright.training.entry import run_recipe_file

    seen: list[tuple[torch.device, torch.device | None]] = []
    real = dist.all_reduce_sum

    def spy(x):
        seen.append((x.device, dist._COLLECTIVE_DEVICE))
        return real(x)

    monkeypatch.setattr(dist, "all_reduce_sum", spy)
    run_recipe_file(REPO / "recipes" / "sft.py", REPO / "configs" / "llama" / "tiny_lora_distributed.yaml",
                    [f"output_dir={tmp_path}", "max_steps=2", "eval_every_n_steps=2", "progress_bar=false",
                     "num_threads=1", "save_every_n_steps=null", "save_adapter=false"])
    # target counts, the logged loss, the held-out totals: every one checked by the guard
    assert len(seen) >= 5 and all(expected is not None and got == expected for got, expected in seen)
    assert dist._COLLECTIVE_DEVICE is None  # the placement let go of it with its process group
