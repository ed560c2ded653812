"""Gemma 1, 2 and 3 (text) against transformers' GemmaForCausalLM, Gemma2ForCausalLM and
Gemma3ForCausalLM, through the real weight maps and `args_from_hf`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_reference import (TOLERANCE, assert_saved_reloads, make_hf_model, max_logit_diff,
                                random_tokens)
from tunewright.models import load_pretrained
from tunewright.models.builder import activation

transformers = pytest.importorskip("transformers")

SEQ = 40  # longer than every sliding window below, so keys fall out of the window
LINEAR8 = {"rope_type": "linear", "factor": 8.0}
_SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4)

CASES = {
    # Gemma 1: MQA with head_dim != hidden / heads (as in gemma-2b), and MHA with biases and
    # the released configs' legacy `hidden_act: "gelu"`, which transformers reads as tanh GELU.
    "gemma_mqa": ("GemmaConfig", "GemmaForCausalLM", dict(
        _SMALL, num_hidden_layers=2, num_key_value_heads=1, head_dim=32)),
    "gemma_mha_bias_gelu": ("GemmaConfig", "GemmaForCausalLM", dict(
        _SMALL, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, hidden_act="gelu",
        attention_bias=True, rope_theta=50000.0)),
    # Gemma 2: soft-caps small enough to bite, a window of 7, query_pre_attn_scalar != head_dim.
    "gemma2_softcaps_window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=7,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        attn_implementation="eager")),
    "gemma2_no_softcap_mqa_untied": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _SMALL, num_hidden_layers=2, num_key_value_heads=1, head_dim=32, sliding_window=5,
        layer_types=["full_attention", "sliding_attention"], attn_logit_softcapping=None,
        final_logit_softcapping=None, tie_word_embeddings=False, attn_implementation="eager")),
    # Gemma 3: 2 local + 1 global with their own RoPE bases, linear scaling on the global one
    # (as in Gemma-3 4B); and MQA with the 5:1 pattern and a final soft-cap.
    "gemma3_local_global_linear_rope": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {**LINEAR8, "rope_theta": 1000000.0}},
        attn_implementation="eager")),
    "gemma3_mqa_pattern6_final_softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _SMALL, num_hidden_layers=7, num_key_value_heads=1, head_dim=32, sliding_window=9,
        query_pre_attn_scalar=20, final_logit_softcapping=2.5,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 100000.0}})),
}


def _hf(tmp_path, name: str, **extra):
    config_cls, model_cls, config = CASES[name]
    model, path = make_hf_model(tmp_path, config_cls, model_cls, **{**config, **extra})
    # At init (std 0.02) attention scores are ~0.02, where a soft-cap changes logits by less
    # than the tolerance; scaled up, soft-caps and windows show plainly.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    model.save_pretrained(path)
    return model, path, model_cls


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    hf_model, hf_dir, _ = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    assert max_logit_diff(hf_model, ours, random_tokens(2, SEQ)) <= TOLERANCE
    # Tanh-approximate and exact GELU differ by < 1e-3, too little to be sure of in the logits.
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(activation(ours.args.activation)(x), hf_model.model.layers[0].mlp.act_fn(x))


@pytest.mark.parametrize("name", list(CASES))
def test_saved_output_reloads_in_transformers(tmp_path, name):
    _, hf_dir, model_cls = _hf(tmp_path, name)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, model_cls, seq=SEQ)


def _released_format(config: dict) -> dict:
    """config.json as the Hub's Gemma-2/3 repos have it (transformers 4.4x-4.5x): no layer_types
    (derived from a pattern), RoPE as rope_theta / rope_local_base_freq / rope_scaling."""
    config = dict(config)
    config.pop("layer_types")
    params = config.pop("rope_parameters")
    if "full_attention" in params:  # Gemma 3
        full = dict(params["full_attention"])
        config["rope_theta"] = full.pop("rope_theta")
        config["rope_scaling"] = full if full["rope_type"] != "default" else None
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = 3
    else:
        config["rope_theta"] = params["rope_theta"]
    return config


@pytest.mark.parametrize("name", ["gemma2_softcaps_window", "gemma3_local_global_linear_rope"])
def test_released_config_format_reads_as_transformers_does(tmp_path, name):
    _, hf_dir, model_cls = _hf(tmp_path, name)
    path = hf_dir / "config.json"
    path.write_text(json.dumps(_released_format(json.loads(path.read_text()))))
    reference = getattr(transformers, model_cls).from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    # Pattern-derived layer types equal those written out before (2 for Gemma 2, 3 here).
    assert reference.config.layer_types == CASES[name][2].get("layer_types", reference.config.layer_types)
    assert max_logit_diff(reference, load_pretrained(hf_dir), random_tokens(2, SEQ)) <= TOLERANCE


@pytest.mark.parametrize("name", ["gemma2_softcaps_window", "gemma3_local_global_linear_rope"])
def test_kv_cache_generation_past_the_window(tmp_path, name):
    """Chunked prefill and token-by-token decoding through our KV caches give the logits of one
    full forward, and greedy generation gives transformers' `generate` tokens."""
    hf_model, hf_dir, _ = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    prompt = random_tokens(1, 4, seed=3)
    new = 24  # window 6-7: decoding goes well past it
    with torch.no_grad():
        want = hf_model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        ours.setup_caches(1, prompt.shape[1] + new)
        tokens = prompt
        logits = ours(prompt, cache_pos=0)[:, -1]
        for _ in range(new):
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            logits = ours(tokens[:, -1:], cache_pos=tokens.shape[1] - 1)[:, -1]
        ours.reset_caches()
        assert torch.equal(tokens, want)

        full = ours(tokens)
        ours.setup_caches(1, tokens.shape[1])
        chunks = [ours(tokens[:, :3], cache_pos=0), ours(tokens[:, 3:14], cache_pos=3)]  # 11 > window
        chunks += [ours(tokens[:, i:i + 1], cache_pos=i) for i in range(14, tokens.shape[1])]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= TOLERANCE


def test_rmsnorm_matches_gemma_in_bf16():
    """Gemma multiplies by (1 + w) in fp32 before casting; Llama casts first. Exact in bf16."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from tunewright.modules.norms import RMSNorm

    ref, ours = GemmaRMSNorm(256, eps=1e-6), RMSNorm(256, eps=1e-6, offset=1.0)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)
        ours.weight.copy_(ref.weight)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = torch.randn(4, 9, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    assert torch.equal(ours(x), ref(x))
