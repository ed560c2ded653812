"""Config validation: each bad input is one line that names the key and the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from tunewright.training.config import ConfigError
from tunewright.training.schema import component, validate


@dataclass(kw_only=True)
class Schema:
    recipe: str
    output_dir: str
    optimizer: dict = component(supplied=("params",), required=True)
    dtype: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = 2
    max_steps: int | None = None
    lr_scale: float = 1.0


def good() -> dict:
    return {"recipe": "x", "output_dir": "/tmp/o",
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.9, 0.95]}}


def error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, Schema, "cfg.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cfg.yaml: ")
    return msg


def test_valid_config_passes():
    validate({**good(), "max_steps": 5, "lr_scale": 2, "dtype": "bf16"}, Schema, "cfg.yaml")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"batch_sise": 4}, "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
        ({"batch_size": "four"}, "key 'batch_size' must be int, got 'four'"),
        ({"batch_size": True}, "key 'batch_size' must be int"),
        ({"dtype": "fp8"}, "key 'dtype' must be 'fp32' | 'bf16'"),
        ({"max_steps": 1.5}, "key 'max_steps' must be int | null"),
        ({"output_dir": None}, "missing required key 'output_dir'"),
        ({"optimizer": {"_component_": "torch.optim.AdamW", "lrr": 1}},
         "unknown key 'optimizer.lrr': torch.optim.AdamW takes no argument 'lrr' (did you mean 'lr'?)"),
        ({"optimizer": {"_component_": "torch.optim.AdamW", "params": []}},
         "key 'optimizer.params' is set by the recipe"),
        ({"optimizer": {"_component_": "torch.optim.NoSuchOptimizer"}}, "cannot import torch.optim.NoSuchOptimizer"),
        ({"optimizer": {"lr": 1}}, "key 'optimizer' must be a mapping with a '_component_' key"),
        ({"optimizer": {"_component_": "tunewright.data.tokenizer.load_tokenizer"}},
         "missing required key 'optimizer.path'"),
    ],
)
def test_bad_inputs_name_the_key(change, expected):
    cfg = {**good(), **change}
    if change.get("output_dir", 0) is None:
        cfg.pop("output_dir")
    assert expected in error(cfg)


# ---------------------------------------------------------------- keys that need another key
def sft_config(*overrides: str):
    from pathlib import Path

    from tunewright.training.entry import import_recipe, load_recipe_config

    repo = Path(__file__).resolve().parent.parent
    module = import_recipe(repo / "recipes" / "sft.py")
    return load_recipe_config(module, repo / "configs" / "llama" / "tiny_full.yaml", list(overrides))


@pytest.mark.parametrize("key", ["lora_alpha=32", "use_dora=true", "quantize_base=true", "save_adapter=false"])
def test_lora_keys_without_lora_rank_fail_naming_both(key):
    with pytest.raises(ConfigError) as e:
        sft_config(key)
    name = key.split("=")[0]
    assert f"key '{name}' needs 'lora_rank' to be set" in str(e.value) and "\n" not in str(e.value)


def test_the_sft_schema_defaults():
    full, lora = sft_config(), sft_config("lora_rank=8")
    assert full.lora_rank is None and lora.lora_rank == 8
    # null: full fine-tuning writes final/, LoRA only its adapter (no merged copy by default)
    assert full.save_final_model is None and lora.save_adapter is True
    assert full.distributed is None and full.activation_checkpointing_every == 1


def test_parallel_keys_on_one_device_fail_before_any_work(tmp_path):
    from pathlib import Path

    from tunewright.training.entry import run_recipe_file

    repo = Path(__file__).resolve().parent.parent
    with pytest.raises(ValueError, match="tensor_parallel_dim: set for a run on one device"):
        run_recipe_file(repo / "recipes" / "sft.py", repo / "configs" / "llama" / "tiny_full.yaml",
                        [f"output_dir={tmp_path}", "tensor_parallel_dim=2"])
    assert not (tmp_path / "config.yaml").exists()
