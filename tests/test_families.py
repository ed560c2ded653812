"""What every model family must satisfy, checked for all of them from the registry alone:
size rows build on the meta device with the parameter count `num_params` promises, the `tiny`
row saved by us loads in transformers with equal logits (through `hf_config` and the weight
map), and full and LoRA fine-tuning of that tiny model learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunewright.models.pretrained import build_model
from tunewright.models.registry import all_families, get_family
from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
FAMILIES = [f.name for f in all_families()]
TINY = [f.name for f in all_families() if f.tiny is not None]
SIZES = [(f.name, s) for f in all_families() for s in f.sizes]


def test_every_family_has_a_tiny_row():
    assert TINY == FAMILIES


@pytest.mark.parametrize("family,size", SIZES)
def test_size_rows_build_on_meta_with_promised_parameter_count(family, size):
    args = get_family(family).sizes[size]
    model = build_model(args)  # meta: costs no memory even for 70B
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


@pytest.mark.parametrize("family", TINY)
def test_tiny_model_saved_by_us_loads_in_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from tunewright.models import load_pretrained
    from tunewright.training.tiny_assets import tiny_asset

    path = tiny_asset(family)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] in get_family(family).model_types
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_pretrained(path)
    seq = 2 * (ours.args.sliding_window or 40)  # long enough to slide past any window
    tokens = torch.randint(0, 259, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4


FAST = ["batch_size=4", "eval_every_n_steps=null", "progress_bar=false", "num_threads=1",
        "max_steps=16", "save_final_model=false", "save_every_n_steps=null"]


@pytest.mark.parametrize("recipe", ["full", "lora"])
@pytest.mark.parametrize("family", TINY)
def test_tiny_model_learns(tmp_path, family, recipe):
    history = run_recipe_file(
        REPO / "recipes" / "sft.py", REPO / "configs" / "llama" / f"tiny_{recipe}.yaml",
        [f"output_dir={tmp_path}", f"model.path=${{tiny:{family}}}", *FAST],
    )
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
