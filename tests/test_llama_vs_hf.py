"""Our Llama-family decoder against transformers' LlamaForCausalLM, through the real weight map."""

from __future__ import annotations

import pytest
import torch

from tunewright.models import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa_untied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "tied_mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                     rope_theta=100000.0),
    "llama3_1_rope_scaling": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "head_dim_not_dim_over_heads": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "biases": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
}


def make_hf_model(tmp_path, **overrides):
    cfg = transformers.LlamaConfig(vocab_size=101, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf_model, hf_dir = make_hf_model(tmp_path, **CONFIGS[name])
    ours = load_pretrained(hf_dir)
    # Positions beyond original_max_position_embeddings exercise every rope-scaling band.
    tokens = torch.randint(0, 101, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape == (2, 80, 101)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gqa_untied", "tied_mha"])
def test_saved_output_reloads_in_transformers(tmp_path, name):
    hf_model, hf_dir = make_hf_model(tmp_path, **CONFIGS[name])
    ours = load_pretrained(hf_dir)
    with torch.no_grad():  # change the weights so a stale copy of the source would be caught
        for p in ours.parameters():
            p.mul_(1.5)
    save_pretrained(ours, tmp_path / "out", source_dir=hf_dir)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, 101, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads_and_keeps_sharding(tmp_path):
    hf_model, _ = make_hf_model(tmp_path, **CONFIGS["gqa_untied"])
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert index.is_file()
    ours = load_pretrained(tmp_path / "sharded")
    tokens = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (ours(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4
    save_pretrained(ours, tmp_path / "resaved", source_dir=tmp_path / "sharded")
    src = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    out = sorted(p.name for p in (tmp_path / "resaved").glob("*.safetensors"))
    assert src == out and len(out) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max().item() <= 1e-4
