"""Recipe options that change how, not what, is computed: bf16, activation checkpointing,
torch.compile, packing — each still trains the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
FULL = REPO / "recipes" / "sft.py"
CONFIG = REPO / "configs" / "llama" / "tiny_full.yaml"
FAST = ["batch_size=4", "eval_every_n_steps=null", "progress_bar=false", "num_threads=1",
        "save_every_n_steps=null", "save_final_model=false"]


def losses(out: Path, *extra: str) -> list[float]:
    return [r["loss"] for r in run_recipe_file(FULL, CONFIG, [f"output_dir={out}", *FAST, *extra])]


def test_bf16_trains_close_to_fp32(tmp_path):
    fp32 = losses(tmp_path / "fp32", "max_steps=6")
    bf16 = losses(tmp_path / "bf16", "max_steps=6", "dtype=bf16")
    assert bf16[0] == pytest.approx(fp32[0], abs=0.05)  # same model and batch, bf16 rounding
    assert bf16[-1] < bf16[0] - 0.3


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = losses(tmp_path / "a", "max_steps=4")
    ckpt = losses(tmp_path / "b", "max_steps=4", "enable_activation_checkpointing=true")
    assert ckpt == pytest.approx(plain, abs=1e-6)


def test_packed_dataset_trains(tmp_path):
    out = losses(tmp_path / "p", "max_steps=6", "dataset.packed=true")
    assert out[-1] < out[0] - 0.3


@pytest.mark.slow
def test_compile_gives_the_same_losses(tmp_path):
    eager = losses(tmp_path / "eager", "max_steps=3")
    compiled = losses(tmp_path / "compiled", "max_steps=3", "compile=true")
    assert compiled == pytest.approx(eager, abs=1e-4)
