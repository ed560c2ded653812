"""The full fine-tuning recipe end to end on the tiny config: it learns, exports a model that
transformers loads, and resumes bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft.py"
CONFIG = REPO / "configs" / "llama" / "tiny_full.yaml"
FAST = ["batch_size=4", "eval_every_n_steps=null", "progress_bar=false", "num_threads=1"]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_trains_and_exports_a_transformers_model(tmp_path):
    out = tmp_path / "run"
    history = run_recipe_file(RECIPE, CONFIG, [f"output_dir={out}", "max_steps=12", *FAST])
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < first - 0.8  # the tiny tasks are learnable: loss falls clearly in 12 steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "tokens_per_second", "time", "num_tokens", "num_tokens_total"):
        assert key in rows[0]
    transformers = pytest.importorskip("transformers")
    from tunewright.models import load_pretrained

    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    ours = load_pretrained(out / "final")
    tokens = torch.randint(0, 259, (1, 20))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
    assert (out / "final" / "tokenizer.json").is_file()


def test_resume_gives_identical_losses(tmp_path, monkeypatch):
    common = [*FAST, "max_steps=8", "save_every_n_steps=4", "save_final_model=false"]
    straight = tmp_path / "straight"
    run_recipe_file(RECIPE, CONFIG, [f"output_dir={straight}", *common])

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 6)  # after the step-4 checkpoint and a logged step 5
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, CONFIG, [f"output_dir={resumed}", *common])
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5]

    run_recipe_file(RECIPE, CONFIG, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    assert losses(resumed) == losses(straight)  # bit-identical, every step once
    assert sorted(losses(straight)) == list(range(1, 9))
