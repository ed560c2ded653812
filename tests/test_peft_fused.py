"""PEFT adapters of a fused checkpoint (Phi-3: qkv_proj, gate_up_proj) against `peft` on the
transformers model: ours load in PEFT with equal logits, PEFT's load in ours with equal logits,
and what cannot be exported is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_reference import TOLERANCE, make_hf_model, random_tokens
from tunewright.models import load_pretrained, save_pretrained
from tunewright.models.peft_adapter import load_peft_adapter, save_peft_adapter
from tunewright.modules.peft.apply import adapter_state_dict, apply_lora, merge_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# GQA (q 64 rows, k and v 32 each) so a wrong split of qkv_proj cannot go unnoticed; LongRoPE and
# partial rotary as in Phi-4-mini; untied so the head can be adapted too.
CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=False,
              max_position_embeddings=256, original_max_position_embeddings=16,
              rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                            "long_factor": [2.0, 3.0, 5.0, 8.0, 13.0, 21.0]},
              pad_token_id=None, bos_token_id=None, eos_token_id=None)
TOKENS = random_tokens(2, 24)


@pytest.fixture
def base(tmp_path):
    return make_hf_model(tmp_path, "Phi3Config", "Phi3ForCausalLM", **CONFIG)[1]


def fresh_hf(path):
    return transformers.Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomise_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)


def logits(model):
    with torch.no_grad():
        out = model(TOKENS)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_peft_loads_our_fused_adapter_with_equal_logits(tmp_path, base, kind):
    ours = load_pretrained(base)
    apply_lora(ours, targets=["q", "k", "v", "o", "gate", "up", "down", "output"], rank=4, alpha=8,
               use_rslora=kind == "rslora", use_dora=kind == "dora")
    randomise_adapter(ours)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"qkv_proj", "gate_up_proj"} <= set(config["target_modules"])

    theirs = peft.PeftModel.from_pretrained(fresh_hf(base), tmp_path / "adapter").eval()
    want = logits(theirs)
    assert (logits(ours) - want).abs().max().item() <= TOLERANCE
    assert (want - logits(fresh_hf(base))).abs().max().item() > 1e-3  # the adapter matters

    # our own adapter loads back into the split layers at its rank, with the same logits
    again = load_peft_adapter(load_pretrained(base), tmp_path / "adapter")
    assert again.lora_config["rank"] == 4
    assert (logits(again) - want).abs().max().item() <= TOLERANCE

    # merged: the fused saver writes qkv_proj/gate_up_proj that transformers reads the same
    merge_lora(ours)
    save_pretrained(ours, tmp_path / "merged", source_dir=base)
    assert (logits(fresh_hf(tmp_path / "merged")) - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("use_dora", [False, True])
def test_we_load_a_fused_adapter_trained_by_peft(tmp_path, base, use_dora):
    """PEFT's B is dense (not block-diagonal): exact only by keeping the whole A in every part."""
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                          init_lora_weights=False, use_dora=use_dora)  # random B: a non-trivial adapter
    torch.manual_seed(2)
    theirs = peft.get_peft_model(fresh_hf(base), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = load_peft_adapter(load_pretrained(base), tmp_path / "peft_adapter")
    assert (logits(ours) - logits(theirs)).abs().max().item() <= TOLERANCE


def test_partly_adapted_fused_layer_is_refused(tmp_path, base):
    ours = load_pretrained(base)
    apply_lora(ours, targets=["q", "v"], rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"^lora targets: adapt q, k, v together in a phi3 model: .*qkv_proj"):
        save_peft_adapter(ours, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_adapter_with_per_layer_ranks_is_refused(tmp_path, base):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"],
                          rank_pattern={"down_proj": 2})
    peft.get_peft_model(fresh_hf(base), cfg).save_pretrained(tmp_path / "peft_adapter")
    with pytest.raises(ValueError, match=r"adapter_config.json: layers with different ranks"):
        load_peft_adapter(load_pretrained(base), tmp_path / "peft_adapter")
