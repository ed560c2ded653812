"""Directories a user names (`save_pretrained`, `save_peft_adapter`, merge-lora, convert-gguf):
refused when they hold anything but a previous output of the same kind, unless asked
(`overwrite=True` in Python, `--force` on the command line), and then only what is written
replaces what was there."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bad_inputs.harness import run_tune
from tunewright.models import load_pretrained, save_pretrained
from tunewright.models.peft_adapter import save_peft_adapter
from tunewright.modules.peft.apply import apply_lora
from tunewright.training.atomic import OutputExistsError
from tunewright.training.tiny_assets import tiny_asset


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_pretrained(tiny_asset("llama"))


def test_save_pretrained_refuses_unrelated_files_and_says_overwrite_true(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"notes\.txt.*pass overwrite=True") as caught:
        save_pretrained(model, tmp_path)
    assert "--force" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written, no temporary
    save_pretrained(model, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert torch.equal(load_pretrained(tmp_path).tok_embeddings.weight, model.tok_embeddings.weight)


def test_saving_over_a_previous_model_replaces_its_weights_and_keeps_other_files(model, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for i in (1, 2):
        save_file({"x": torch.zeros(1)}, str(tmp_path / f"model-0000{i}-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "README.md").write_text("model card")
    save_pretrained(model, tmp_path)  # a Hugging Face model directory: no overwrite needed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path).norm.weight, model.norm.weight)


def test_save_peft_adapter_refuses_unrelated_files_and_replaces_a_previous_adapter(tmp_path):
    lora = load_pretrained(tiny_asset("llama"))
    apply_lora(lora, targets=["q", "v"], rank=2, alpha=4)
    (tmp_path / "a" / "train.jsonl").parent.mkdir()
    (tmp_path / "a" / "train.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="train.jsonl"):
        save_peft_adapter(lora, tmp_path / "a")
    save_peft_adapter(lora, tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("mine")
    save_peft_adapter(lora, tmp_path / "b")  # a previous adapter: replaced, the note stays
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors", "notes.txt"]


def test_merge_lora_force_writes_beside_unrelated_files(model, tmp_path):
    lora = load_pretrained(tiny_asset("llama"))
    apply_lora(lora, targets=["q", "v"], rank=2, alpha=4)
    save_peft_adapter(lora, tmp_path / "adapter", base_model_path=str(tiny_asset("llama")))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["merge-lora", str(tiny_asset("llama")), str(tmp_path / "adapter"), "--output-dir", str(out)]
    refused = run_tune(argv, cwd=tmp_path)
    assert refused.code == 2 and "--force" in refused.err and "overwrite=True" not in refused.err
    done = run_tune([*argv, "--force"], cwd=tmp_path)
    assert done.code == 0, done.err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
