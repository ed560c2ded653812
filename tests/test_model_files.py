"""Model, adapter and evaluation inputs that cannot work fail in one line naming what to fix:
shapes that do not divide (by their config.json names), non-finite weights (tensor and file),
unreadable safetensors, corrupt adapter configs, data ids beyond the vocabulary, and a held-out
loss over zero tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tunewright.models.args import ModelArgs
from tunewright.models.peft_adapter import read_adapter_config
from tunewright.models.pretrained import check_finite, read_safetensors
from tunewright.models.registry import all_families, model_args
from tunewright.training.tiny_assets import tiny_asset


def tiny_llama() -> ModelArgs:
    return next(f.tiny for f in all_families() if f.name == "llama")


def test_every_shipped_row_is_a_valid_shape():
    rows = [(f.name, name, a) for f in all_families() for name, a in [*f.sizes.items(), ("tiny", f.tiny)] if a]
    for family, name, args in rows:  # made through the validation again, field by field
        assert args.replace() == args, (family, name)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(num_heads=3, head_dim=None, num_kv_heads=3),
     "num_attention_heads (num_heads) = 3 does not divide hidden_size (dim) = 128 (and no head_dim is given)"),
    (dict(num_kv_heads=3), "num_key_value_heads (num_kv_heads) = 3 does not divide num_attention_heads (num_heads) = 4"),
    (dict(num_kv_heads=0), "num_key_value_heads (num_kv_heads) must be a positive whole number, got 0"),
    (dict(num_layers=-2), "num_hidden_layers (num_layers) must be a positive whole number, got -2"),
    (dict(dim=128.0), "hidden_size (dim) must be a positive whole number, got 128.0"),
    (dict(head_dim=33), "the rotary dim 33 must be even"),
    (dict(num_experts=4, experts_per_token=5), "num_experts_per_tok (experts_per_token) = 5 must be between 1"),
    (dict(layer_types=("full_attention",)), "layer_types must list"),
])
def test_shapes_that_cannot_work_are_named_by_their_config_keys(changes, message):
    with pytest.raises(ValueError) as e:
        tiny_llama().replace(**changes)
    assert str(e.value).startswith(message)


def test_model_args_names_config_json(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_asset("llama"), model)
    config = json.loads((model / "config.json").read_text())
    assert model_args(model)[1].num_params() == tiny_llama().num_params()
    for change, message in (({"num_key_value_heads": 3}, "does not divide"),
                            ({"intermediate_size": None}, "lacks the key 'intermediate_size'"),
                            ({"hidden_size": "128"}, "hidden_size (dim) must be a positive whole number")):
        broken = {k: v for k, v in {**config, **change}.items() if v is not None}
        (model / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError) as e:
            model_args(model)
        assert str(e.value).startswith(f"{model / 'config.json'}: ") and message in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", [0, 4095, 1234])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_found_wherever_they_are(tmp_path, dtype, where, value):
    tensor = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    check_finite(tensor, "w", tmp_path / "model.safetensors")  # finite: silent
    tensor[where] = value
    what = "NaN" if value != value else "infinite"
    with pytest.raises(ValueError, match=f"model.safetensors: tensor 'w' holds {what} values"):
        check_finite(tensor.view(64, 64), "w", tmp_path / "model.safetensors")
    check_finite(torch.tensor([1, 2**31 - 1]), "ids", tmp_path / "x")  # integers cannot be NaN


def test_unreadable_safetensors_are_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    assert torch.equal(read_safetensors(path)["a"], torch.ones(64, 64))
    for content in (path.read_bytes()[:200], b"", b"\x89PNG\r\n\x1a\n" + bytes(100)):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{path}: cannot read safetensors file"):
            read_safetensors(path)


def test_adapter_config_problems_name_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    for text, message in (('{"r": 8,\n "lora_alpha": }', "not valid JSON at line 2 column 16"),
                          ('{"r": 0, "lora_alpha": 16}', "'r' must be a positive number, got 0"),
                          ('{"r": 8, "lora_alpha": "x"}', "'lora_alpha' must be a positive number"),
                          ('{"r": 8}', "lacks 'lora_alpha'"),
                          ('{"peft_type": "IA3", "r": 8}', "peft_type IA3 is not supported")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: {message}"):
            read_adapter_config(tmp_path)


# --- data against the model, before it loads -------------------------------------------------


class _Tokenizer:
    pad_id, vocab_size = 0, 300

    def id_to_token(self, id_: int) -> str:
        return f"<{id_}>"


class _Data:
    source = "rows.jsonl"

    def __init__(self, largest: int) -> None:
        self.max_token_id = largest


def test_ids_beyond_the_vocabulary_fail_naming_data_model_and_tokenizer(tmp_path):
    from tunewright.training.data_setup import check_ids_fit

    check_ids_fit(_Data(199), _Tokenizer(), 200, tmp_path)  # the largest id fits
    with pytest.raises(ValueError) as e:
        check_ids_fit(_Data(200), _Tokenizer(), 200, tmp_path)
    assert str(e.value) == (f"the tokenizer does not fit the model: rows.jsonl holds token id 200 ('<200>'), "
                            f"but {tmp_path / 'config.json'} has vocab_size 200 (the tokenizer has 300 ids); "
                            f"use the model's own tokenizer")
    tokenizer = _Tokenizer()
    tokenizer.pad_id = 250  # padding is written into every short row
    with pytest.raises(ValueError, match=r"its pad id is 250 \('<250>'\), but"):
        check_ids_fit(_Data(10), tokenizer, 200, tmp_path)


def test_held_out_loss_over_no_tokens_has_no_value():
    from tunewright.data.collate import collate_padded
    from tunewright.training.objectives import evaluate_loss

    class Batches:  # a validation set whose rows have no target
        def first_epoch(self):
            yield collate_padded([{"tokens": [1, 2, 3], "labels": [-100, -100, -100]}], pad_id=0)

    model = torch.nn.Linear(1, 1)
    never = lambda model, batch: (torch.zeros(()), batch["num_targets"])  # noqa: E731
    with pytest.raises(ValueError, match="hold no target token, so there is no loss to report"):
        evaluate_loss(model, Batches(), never, device="cpu")
    with pytest.raises(ValueError, match="max_eval_batches must be at least 1"):
        evaluate_loss(model, Batches(), never, device="cpu", max_batches=0)
    assert model.training  # the mode it was in
