"""Our Qwen2/Qwen2.5 and Qwen3 decoders against transformers' Qwen2ForCausalLM and
Qwen3ForCausalLM, through the real weight maps and config readers/writers."""

from __future__ import annotations

import pytest
import torch

from tests.hf_reference import (TOLERANCE, assert_saved_reloads, make_hf_model, max_logit_diff,
                                random_tokens)
from tunewright.models import load_pretrained, save_pretrained
from tunewright.models.registry import get_family

transformers = pytest.importorskip("transformers")

SEQ = 40  # longer than every window below, so sliding layers really drop keys
SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0)

QWEN2 = {
    "gqa_tied": dict(SMALL, tie_word_embeddings=True),
    "mha_untied": dict(SMALL, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    # max_window_layers=2 of 4: the last two layers slide (pre-transformers-5 configs say only this)
    "sliding_max_window_layers": dict(SMALL, num_hidden_layers=4, use_sliding_window=True,
                                      sliding_window=8, max_window_layers=2),
    "sliding_layer_types": dict(SMALL, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Published Qwen2.5 configs carry a window but use_sliding_window=false: no layer slides.
    "window_switched_off": dict(SMALL, use_sliding_window=False, sliding_window=4, max_window_layers=0),
}
QWEN3 = {
    # Qwen3-0.6B to 4B have num_heads * head_dim != hidden_size.
    "gqa_untied_wide_heads": dict(SMALL, head_dim=32, tie_word_embeddings=False),
    "tied_attention_bias": dict(SMALL, head_dim=16, num_key_value_heads=1, tie_word_embeddings=True,
                                attention_bias=True),
    "sliding_max_window_layers": dict(SMALL, num_hidden_layers=3, head_dim=16, use_sliding_window=True,
                                      sliding_window=6, max_window_layers=1),
}
CASES = [pytest.param(family, config_cls, model_cls, name, cfg, id=f"{family}-{name}")
         for family, config_cls, model_cls, table in [("qwen2", "Qwen2Config", "Qwen2ForCausalLM", QWEN2),
                                                      ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3)]
         for name, cfg in table.items()]
ARGS = "family,config_cls,model_cls,name,config"


def cases(*names: str) -> list:
    return [c for c in CASES if c.values[3] in names]


@pytest.mark.parametrize(ARGS, CASES)
def test_logits_match_transformers(tmp_path, family, config_cls, model_cls, name, config):
    hf_model, hf_dir = make_hf_model(tmp_path, config_cls, model_cls, **config)
    ours = load_pretrained(hf_dir)
    assert ours.args.family == family
    tokens = random_tokens(2, SEQ)
    assert max_logit_diff(hf_model, ours, tokens) <= TOLERANCE
    if config.get("use_sliding_window"):
        # The comparison above only means something if the window changes the logits.
        for layer in ours.layers:
            layer.attn.sliding_window = None
        assert max_logit_diff(hf_model, ours, tokens) > 1e-3


@pytest.mark.parametrize(ARGS, CASES)
def test_config_we_write_loads_in_transformers(tmp_path, family, config_cls, model_cls, name, config):
    """No source directory: config.json comes from our `hf_config`, and must give transformers
    the same model (biases, tying, q/k norms, which layers slide)."""
    hf_model, hf_dir = make_hf_model(tmp_path, config_cls, model_cls, **config)
    save_pretrained(load_pretrained(hf_dir), tmp_path / "ours")
    reloaded = getattr(transformers, model_cls).from_pretrained(tmp_path / "ours", dtype=torch.float32)
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max().item() <= TOLERANCE
    assert reloaded.config.layer_types == hf_model.config.layer_types


@pytest.mark.parametrize(ARGS, cases("gqa_tied", "sliding_max_window_layers", "tied_attention_bias"))
def test_saved_output_reloads_in_transformers(tmp_path, family, config_cls, model_cls, name, config):
    _, hf_dir = make_hf_model(tmp_path, config_cls, model_cls, **config)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, model_cls, seq=SEQ)


# Non-embedding parameter counts the model cards publish (Qwen/Qwen2.5-*-Instruct, Qwen/Qwen3-*).
PUBLISHED_NON_EMBEDDING = {
    "qwen2_5_0_5b": "0.36", "qwen2_5_1_5b": "1.31", "qwen2_5_3b": "2.77", "qwen2_5_7b": "6.53",
    "qwen3_0_6b": "0.44", "qwen3_1_7b": "1.4", "qwen3_4b": "3.6", "qwen3_8b": "6.95",
}


@pytest.mark.parametrize("size", list(PUBLISHED_NON_EMBEDDING))
def test_size_rows_are_the_published_models(size):
    """transformers builds the same parameter count from the config.json we would write, and its
    non-embedding part is the model card's."""
    family = get_family(size.split("_")[0])  # qwen2_5_7b -> qwen2
    args = family.sizes[size]
    config = transformers.AutoConfig.for_model(**family.hf_config(args))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == args.num_params()
    embeddings = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    published = PUBLISHED_NON_EMBEDDING[size]
    decimals = len(published.split(".")[1])
    assert f"{(args.num_params() - embeddings) / 1e9:.{decimals}f}" == published


@pytest.mark.parametrize(ARGS, cases("sliding_max_window_layers"))
def test_cached_decoding_past_the_window_equals_transformers(
        tmp_path, family, config_cls, model_cls, name, config):
    """KV-cache decoding (prefill, then one token at a time) must keep dropping the keys that
    leave the window: each step's logits equal transformers' on the whole sequence."""
    hf_model, hf_dir = make_hf_model(tmp_path, config_cls, model_cls, **config)
    ours = load_pretrained(hf_dir)
    tokens = random_tokens(1, SEQ, seed=3)
    prefill = 12
    with torch.no_grad():
        want = hf_model(tokens).logits
        ours.setup_caches(1, SEQ)
        steps = [ours(tokens[:, :prefill], cache_pos=0)]
        steps += [ours(tokens[:, i:i + 1], cache_pos=i) for i in range(prefill, SEQ)]
    assert (torch.cat(steps, dim=1) - want).abs().max().item() <= TOLERANCE
