"""Config validation: each bad input is one line that names the key and the file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pytest

from tunewright.training.config import ConfigError
from tunewright.training.schema import Matches, PositiveInt, Range, component, validate

REPO = Path(__file__).resolve().parent.parent


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


# ---------------------------------------------------------------- ranges
def test_every_range_names_the_key_the_bound_and_the_file():
    @dataclass(kw_only=True)
    class Ranged:
        count: PositiveInt = 1
        limit: Annotated[int, Range(ge=1, hint="null: no limit")] | None = None
        rate: Annotated[float, Range(ge=0, lt=1)] = 0.0
        scale: Annotated[float, Range(gt=0)] | None = 1.0
        sizes: list[PositiveInt] = dataclasses.field(default_factory=list)
        where: Annotated[str, Matches(r"cpu|cuda(:\d+)?", "cpu or cuda:N")] = "cpu"

    def fails(**values) -> str:
        with pytest.raises(ConfigError) as e:
            validate(values, Ranged, "r.yaml")
        return str(e.value)

    validate({"count": 3, "limit": None, "rate": 0.5, "scale": None, "sizes": [1, 2], "where": "cuda:1"},
             Ranged, "r.yaml")
    assert fails(count=0) == "r.yaml: key 'count' must be >= 1, got 0"
    assert fails(limit=0) == "r.yaml: key 'limit' must be >= 1 (null: no limit), got 0"
    assert fails(rate=1) == "r.yaml: key 'rate' must be >= 0 and < 1, got 1"
    assert fails(rate=float("nan")) == "r.yaml: key 'rate' must be >= 0 and < 1, got nan"
    assert fails(scale=-0.5) == "r.yaml: key 'scale' must be > 0 or null, got -0.5"
    assert fails(sizes=[2, 0]) == "r.yaml: key 'sizes' must be >= 1, got [2, 0]"
    assert fails(where="tpu9") == "r.yaml: key 'where' must be cpu or cuda:N, got 'tpu9'"
    assert fails(count="3") == "r.yaml: key 'count' must be int, got '3'"  # types first


def takes_a_count(num_items: Annotated[int, Range(ge=1)] = 1) -> int:
    return num_items


def test_a_components_annotated_ranges_are_checked_too():
    from tunewright.training.instantiate import components_allowed

    node = {"_component_": f"{__name__}.takes_a_count", "num_items": 0}
    with components_allowed([__name__]), pytest.raises(ConfigError) as e:
        validate({**good(), "optimizer": {**good()["optimizer"]}, "loss": node}, WithLoss, "cfg.yaml")
    assert str(e.value) == "cfg.yaml: key 'loss.num_items' must be >= 1, got 0"


@dataclass(kw_only=True)
class WithLoss(Schema):
    loss: dict = component()


SHIPPED_BOUNDS = [  # (recipe, config, override, the message's key and bound), from the issue
    ("sft", "tiny_lora", "batch_size=0", "key 'batch_size' must be >= 1"),
    ("sft", "tiny_lora", "epochs=0", "key 'epochs' must be >= 1"),
    ("sft", "tiny_lora", "max_steps=0", "key 'max_steps' must be >= 1 (null: no limit)"),
    ("sft", "tiny_lora", "max_steps=-3", "key 'max_steps' must be >= 1"),
    ("sft", "tiny_lora", "gradient_accumulation_steps=-1", "key 'gradient_accumulation_steps' must be >= 1"),
    ("sft", "tiny_lora", "loss_chunk_size=-1", "key 'loss_chunk_size' must be >= 1"),
    ("sft", "tiny_lora", "clip_grad_norm=-1.0", "key 'clip_grad_norm' must be > 0 (null: no clipping)"),
    ("sft", "tiny_lora", "log_every_n_steps=0", "key 'log_every_n_steps' must be >= 1"),
    ("sft", "tiny_lora", "num_threads=-1", "key 'num_threads' must be >= 1 or null"),
    ("sft", "tiny_lora", "keep_last_n_checkpoints=0", "key 'keep_last_n_checkpoints' must be >= 1 (null: keep all)"),
    ("sft", "tiny_lora", "max_eval_batches=0", "key 'max_eval_batches' must be >= 1"),
    ("sft", "tiny_lora", "lora_rank=0", "key 'lora_rank' must be >= 1"),
    ("sft", "tiny_lora", "lora_alpha=0", "key 'lora_alpha' must be > 0"),
    ("sft", "tiny_lora", "lora_dropout=1.0", "key 'lora_dropout' must be >= 0 and < 1"),
    ("sft", "tiny_lora", "device=tpu9", "key 'device' must be cpu, cuda, cuda:N, mps, xpu or auto"),
    ("sft", "tiny_lora_distributed", "tensor_parallel_dim=0", "key 'tensor_parallel_dim' must be >= 1"),
    ("sft", "tiny_lora_distributed", "collective_timeout_minutes=0", "key 'collective_timeout_minutes' must be >= 1"),
    ("generate", "tiny_generate", "max_new_tokens=0", "key 'max_new_tokens' must be >= 1"),
    ("generate", "tiny_generate", "temperature=-0.5", "key 'temperature' must be >= 0 (0: greedy)"),
    ("generate", "tiny_generate", "top_k=0", "key 'top_k' must be >= 1"),
    ("generate", "tiny_generate", "top_p=1.5", "key 'top_p' must be > 0 and <= 1"),
    ("evaluate", "tiny_evaluate", "generate_batch_size=0", "key 'generate_batch_size' must be >= 1"),
]


@pytest.mark.parametrize("recipe, config, override, message", SHIPPED_BOUNDS,
                         ids=[f"{r}-{o}" for r, _, o, _ in SHIPPED_BOUNDS])
def test_the_recipes_schemas_carry_the_bounds(recipe, config, override, message):
    from tunewright.training.entry import import_recipe, load_recipe_config

    config_path = REPO / "configs" / "llama" / f"{config}.yaml"
    with pytest.raises(ConfigError) as e:
        load_recipe_config(import_recipe(REPO / "recipes" / f"{recipe}.py"), config_path, [override])
    assert str(e.value).startswith(f"{config_path}: {message}"), str(e.value)


# ---------------------------------------------------------------- the defaults a user gets
# Independent of the dataclasses: what the README and the comments promise. Each recipe under
# recipes/ needs a minimal config and its defaults here.
MODEL = {"_component_": "tunewright.models.load_pretrained", "path": "/m"}
TOKENIZER = {"_component_": "tunewright.data.tokenizer.load_tokenizer", "path": "/m"}
DATASET = {"_component_": "tunewright.data.sft_dataset", "source": "/d.jsonl"}
MINIMAL = {
    "sft": {"recipe": "sft", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER, "dataset": DATASET,
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4}},
    "generate": {"recipe": "generate", "model": MODEL, "tokenizer": TOKENIZER, "prompt": "Hi"},
    "evaluate": {"recipe": "evaluate", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
                 "dataset": DATASET},
    "dpo": {"recipe": "dpo", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
            "dataset": {"_component_": "tunewright.data.preference.preference_dataset", "source": "/p.jsonl"},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-6}},
    "reward_model": {"recipe": "reward_model", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
                     "dataset": {"_component_": "tunewright.data.preference.preference_dataset", "source": "/p.jsonl"},
                     "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4}},
    "process_reward_model": {"recipe": "process_reward_model", "output_dir": "/o", "model": MODEL,
                             "tokenizer": TOKENIZER, "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4},
                             "dataset": {"_component_": "tunewright.data.step_labels.step_label_dataset",
                                         "source": "/s.jsonl"}},
    "knowledge_distillation": {"recipe": "knowledge_distillation", "output_dir": "/o", "model": MODEL,
                               "teacher_model": MODEL, "tokenizer": TOKENIZER, "dataset": DATASET,
                               "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4}},
    "grpo": {"recipe": "grpo", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
             "dataset": {"_component_": "tunewright.data.prompts.prompt_dataset", "source": "/d.jsonl"},
             "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4},
             "rewards": {"_component_": "tunewright.training.rewards.RewardSet",
                         "functions": [{"_component_": "tunewright.training.rewards.exact_match"}]}},
    "ppo": {"recipe": "ppo", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
            "dataset": {"_component_": "tunewright.data.prompts.prompt_dataset", "source": "/d.jsonl"},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-6},
            "rewards": {"_component_": "tunewright.training.rewards.RewardSet",
                        "functions": [{"_component_": "tunewright.training.rewards.exact_match"}]}},
    "quantize": {"recipe": "quantize", "output_dir": "/o", "model": MODEL,
                 "quantization": {"scheme": "int4_weight_only"}},
    "eleuther_eval": {"recipe": "eleuther_eval", "output_dir": "/o", "model": MODEL, "tokenizer": TOKENIZER,
                      "tasks": ["hellaswag"]},
}
RUN_DEFAULTS = {"seed": 0, "device": "cpu", "dtype": "fp32", "num_threads": None, "loss_chunk_size": 1024}
DEFAULTS = {
    "sft": {**RUN_DEFAULTS, "batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 1,
            "max_steps_per_epoch": None, "max_steps": None, "clip_grad_norm": 1.0, "shuffle": True,
            "padding_free": True, "num_workers": None, "pin_memory": None, "log_every_n_steps": 1,
            "eval_every_n_steps": None,
            "save_every_n_steps": None, "keep_last_n_checkpoints": 2, "resume_from_checkpoint": False,
            "save_final_model": None, "progress_bar": True, "val_dataset": None, "lr_scheduler": None,
            "lora_rank": None, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": "all-linear",
            "save_adapter": True, "quantize_base": False, "use_dora": False, "distributed": None,
            "init_lora_weights": True, "loftq_iter": 1,  # PEFT's LoraConfig / LoftQConfig defaults
            "tensor_parallel_dim": 1, "data_parallel_dim": None, "collective_timeout_minutes": 60,
            "compile": False, "enable_activation_checkpointing": False, "optimizer_in_backward": False,
            # no QAT unless `quantization:`; then fake quantization from the first step (torchtune's QAT)
            "quantization": None, "fake_quant_after_n_steps": None},
    "generate": {"adapter": None, "system_prompt": None, "chat": True, "max_new_tokens": 128,
                 "temperature": 0.0, "top_k": None, "top_p": None, "seed": None, "device": "cpu",
                 "dtype": "fp32", "num_threads": None, "compile": False},
    "evaluate": {**RUN_DEFAULTS, "adapter": None, "batch_size": 8, "answer_column": "answer", "task": None,
                 "max_new_tokens": 32, "max_answers": None, "generate_batch_size": 64, "compile": False},
    # TRL 1.16's DPOConfig (beta 0.1, sigmoid loss, no label smoothing), CPOConfig's SimPO gamma 0.5,
    # KTOConfig's weights 1.0; the live reference unless precompute_ref_logps.
    "dpo": {**RUN_DEFAULTS, "loss": "dpo", "beta": 0.1, "label_smoothing": 0.0, "robust": False, "gamma": 0.5,
            "desirable_weight": 1.0, "undesirable_weight": 1.0, "precompute_ref_logps": False, "lora_rank": None,
            "padding_free": True},
    # TRL's RewardConfig: no centring unless asked (it suggests 0.01); LoRA and saving as sft.
    # TRL's PRMConfig has no keys of its own that apply here (step_separator is the dataset's)
    "process_reward_model": {**RUN_DEFAULTS, "lora_rank": None, "save_final_model": None, "padding_free": True},
    "reward_model": {**RUN_DEFAULTS, "center_rewards_coefficient": None, "lora_rank": None, "save_final_model": None,
                     "save_adapter": True, "padding_free": True, "clip_grad_norm": 1.0},
    # torchtune's KD recipe: forward KL, kd_ratio 0.5, temperature 1; off-policy unless lmbda > 0
    # (GKD's on-policy fraction); generalized JSD's beta 0.5 as TRL's GKDConfig.
    "knowledge_distillation": {**RUN_DEFAULTS, "teacher_dtype": None, "kd_loss": "forward_kl", "beta": 0.5,
                               "temperature": 1.0, "kd_ratio": 0.5, "lmbda": 0.0, "max_new_tokens": 128,
                               "teacher_top_k": None, "teacher_cache_dir": None, "lora_rank": None,
                               "batch_size": 2},
    # TRL 1.16's GRPOConfig defaults, but max_new_tokens (TRL's max_completion_length: 512)
    "grpo": {**RUN_DEFAULTS, "num_generations": 8, "max_new_tokens": 256, "temperature": 1.0, "top_k": None,
             "top_p": None, "ppo_epochs": 1, "num_minibatches": 1, "loss_type": "dapo",
             "importance_sampling_level": "token", "epsilon": 0.2, "epsilon_high": None, "beta": 0.0,
             "scale_rewards": "group", "mask_truncated_completions": False, "dynamic_sampling": False,
             "lora_rank": None},
    # TRL's PPOConfig defaults (0.2x; TRL 1.x ships no PPO trainer): kl_coef 0.05 k1, cliprange 0.2 both, vf_coef 0.1,
    # γ 1, λ 0.95, 4 epochs, temperature 0.7; but max_new_tokens (TRL's response_length: 53) as grpo's
    "ppo": {**RUN_DEFAULTS, "max_new_tokens": 256, "temperature": 0.7, "top_k": None, "top_p": None, "ppo_epochs": 4,
            "num_minibatches": 1, "epsilon": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "kl_coef": 0.05,
            "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "whiten_rewards": False, "missing_eos_penalty": None,
            "value_model": None, "value_optimizer": None, "ref_model": None, "reward_model": None, "lora_rank": None},
    # PTQ rounds in the dtype the quantized model will compute in: bf16 unless asked
    "quantize": {"device": "cpu", "dtype": "bf16", "num_threads": None, "seed": 0, "tokenizer": None,
                 "dataset": None, "batch_size": 8, "loss_chunk_size": 1024},
    # torchtune's eleuther_eval (batch 8, KV cache on, no limit) and lm-eval's CLI (task's own
    # few-shot, no chat template, 256 new tokens as HFLM, 100000 bootstrap iterations); the
    # model's own context length (torchtune: 4096) and bos as the tokenizer's files say (HFLM)
    "eleuther_eval": {"adapter": None, "include_path": [], "limit": None, "num_fewshot": None, "batch_size": 8,
                      "max_seq_length": None, "max_gen_toks": 256, "enable_kv_cache": True,
                      "apply_chat_template": False, "system_instruction": None, "fewshot_as_multiturn": False,
                      "add_bos_token": None, "log_samples": False, "bootstrap_iters": 100000, "seed": 0,
                      "device": "cpu", "dtype": "fp32", "num_threads": None},
}
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_resolved_defaults_of_every_recipe(recipe):
    from tunewright.training.entry import import_recipe
    from tunewright.training.schema import build

    assert recipe in MINIMAL and recipe in DEFAULTS, f"recipes/{recipe}.py: add its minimal config and defaults"
    schema = import_recipe(REPO / "recipes" / f"{recipe}.py").Config
    validate(MINIMAL[recipe], schema, "minimal.yaml")
    cfg = build(MINIMAL[recipe], schema)
    assert {k: getattr(cfg, k) for k in DEFAULTS[recipe]} == DEFAULTS[recipe]


@pytest.mark.parametrize("config, written, absent", [
    ("tiny_lora", "adapter", "merged"),  # LoRA: the adapter is the result; no merged copy
    ("tiny_full", "final", "adapter"),  # full fine-tuning: null save_final_model means true
])
def test_a_run_applies_the_save_defaults(tmp_path, config, written, absent):
    from tunewright.training.entry import run_recipe_file

    run_recipe_file(REPO / "recipes" / "sft.py", REPO / "configs" / "llama" / f"{config}.yaml",
                    [f"output_dir={tmp_path}", "save_final_model=null", "max_steps=1", "eval_every_n_steps=null",
                     "save_every_n_steps=null", "progress_bar=false", "num_threads=1"])
    assert (tmp_path / written / "config.json").is_file() or (tmp_path / written / "adapter_config.json").is_file()
    assert not (tmp_path / absent).exists() and not (tmp_path / "merged").exists()


# ---------------------------------------------------------------- overrides as typed
@pytest.mark.parametrize("override, value", [
    ("prompt=Reverse the letters: abc", "Reverse the letters: abc"),  # YAML: a mapping
    ('prompt="Reverse the letters: abc"', "Reverse the letters: abc"),  # quoted inside the shell
    ("prompt=What is #1?", "What is #1?"),  # YAML: a comment from ` #`
    ('prompt=Say: "hi" now', 'Say: "hi" now'),  # YAML: a syntax error
    ("prompt=- a list?", "- a list?"),  # YAML: a block list
    ("prompt=  two  spaces", "two  spaces"),
    ("prompt=${recipe}", "generate"),  # interpolations still resolve
    ("lr=1e-4", 1e-4), ("n=3", 3), ("flag=true", True), ("x=null", None),
    ("targets=[q, v]", ["q", "v"]), ("opts={a: 1}", {"a": 1}),
])
def test_override_values(tmp_path, override, value):
    from tunewright.training.config import load_config, to_dict

    (tmp_path / "c.yaml").write_text("recipe: generate\nprompt: x\n")
    key = override.split("=", 1)[0]
    assert to_dict(load_config(tmp_path / "c.yaml", [override]))[key] == value


@pytest.mark.parametrize("override", ["targets=[q, v", "opts={a: 1", 'prompt="abc'])
def test_an_override_meant_as_yaml_that_is_not_fails_in_one_line(tmp_path, override):
    from tunewright.training.config import load_config

    (tmp_path / "c.yaml").write_text("recipe: generate\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml", [override])
    assert str(e.value).startswith(f"override '{override}': not valid YAML: ") and "\n" not in str(e.value)


# ---------------------------------------------------------------- secrets from the environment
def test_values_from_the_environment_are_saved_as_written(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from tunewright.training.entry import import_recipe, load_recipe_config
    from tunewright.training.run import save_config

    secret = "hf_s3cr3t-token"
    monkeypatch.setenv("MY_TOKEN", secret)
    monkeypatch.setenv("MY_SPLIT", "train")  # a value that also occurs elsewhere, in clear
    cfg = load_recipe_config(
        import_recipe(REPO / "recipes" / "sft.py"), REPO / "configs" / "llama" / "tiny_lora.yaml",
        ["dataset.split=${oc.env:MY_SPLIT}", "output_dir=/runs/${oc.env:MY_TOKEN}",
         "val_dataset.split=${dataset.split}"])
    assert cfg.output_dir == f"/runs/{secret}" and cfg.dataset["split"] == "train"  # resolved for the run
    save_config(cfg, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert secret not in text
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"), resolve=False)
    assert saved["output_dir"] == "/runs/${oc.env:MY_TOKEN}"
    assert saved["dataset"]["split"] == "${oc.env:MY_SPLIT}" and saved["val_dataset"]["split"] == "${dataset.split}"
    assert saved["shuffle"] is True and saved["model"]["_component_"] == "tunewright.models.load_pretrained"


# ---------------------------------------------------------------- the component allow-list
@pytest.mark.parametrize("path, allowed", [
    ("torch.optim.AdamW", True), ("tunewright.data.sft_dataset", True), ("torchao.optim.AdamW8bit", True),
    ("os.system", False), ("subprocess.run", False), ("torchvision.models.resnet18", False),
    ("tunewrightx.evil", False), ("torch.hub.load", False), ("torch.load", False),
    ("torch.utils.cpp_extension.load_inline", False), ("tunewright.training.entry.import_recipe", False),
])
def test_the_allow_list(path, allowed, monkeypatch):
    from tunewright.training.instantiate import ALLOW_ENV, check_allowed

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    if allowed:
        check_allowed(path, where="k")
        return
    with pytest.raises(ConfigError) as e:
        check_allowed(path, where="c.yaml: key 'x._component_'")
    assert str(e.value).startswith(f"c.yaml: key 'x._component_': {path} ") and "--allow-components" in str(e.value)


def test_allowing_a_package_is_the_users_choice_and_ends_with_the_command(monkeypatch):
    from tunewright.training.instantiate import ALLOW_ENV, check_allowed, components_allowed

    monkeypatch.setenv(ALLOW_ENV, "mypkg.losses")
    check_allowed("mypkg.losses.focal", where="k")
    with pytest.raises(ConfigError):
        check_allowed("mypkg.other", where="k")  # a prefix of dotted names, not of text
    with components_allowed(["os.", "torch.hub"]):
        check_allowed("os.system", where="k")
        check_allowed("torch.hub.load", where="k")  # named explicitly: allowed
        check_allowed("mypkg.losses.focal", where="k")
    assert os.environ[ALLOW_ENV] == "mypkg.losses"
    with pytest.raises(ConfigError, match="--allow-components: 'my-pkg' is not a dotted package path"):
        with components_allowed(["my-pkg"]):
            pass


def test_nothing_is_imported_for_a_refused_path(tmp_path, monkeypatch):
    import sys

    from tunewright.training.instantiate import resolve_component

    (tmp_path / "side_effect_pkg.py").write_text("import pathlib; pathlib.Path(__file__ + '.ran').touch()\n"
                                                 "def f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="outside the packages a config may call"):
        resolve_component("side_effect_pkg.f")
    assert "side_effect_pkg" not in sys.modules and not (tmp_path / "side_effect_pkg.py.ran").exists()
