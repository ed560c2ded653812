"""Our Mistral against transformers' MistralForCausalLM, through the real weight map: the
sliding window (where config.json sets one) in a full forward, in cached decoding and in
padding-free batches, and our saved checkpoints reloading in transformers."""

from __future__ import annotations

import pytest
import torch

from tests.hf_reference import (TOLERANCE, VOCAB, assert_saved_reloads, make_hf_model,
                                max_logit_diff, random_tokens)
from tunewright.models import load_pretrained

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "window_gqa_untied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                              tie_word_embeddings=False, rms_norm_eps=1e-5),
    "no_window_mha_tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, sliding_window=None,
                               tie_word_embeddings=True, rope_theta=1000000.0),
    "window_wide_heads": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              sliding_window=7),
}
SEQ = 48  # past every window above, so keys really leave it


def _sharpen_attention(model) -> None:
    # At HF's init (std 0.02) attention is nearly uniform; larger q/k make each position's
    # keys matter, so a window in the wrong place shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(20.0)


def _hf(tmp_path, name):
    model, path = make_hf_model(tmp_path, "MistralConfig", "MistralForCausalLM", **CONFIGS[name])
    _sharpen_attention(model)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf_model, hf_dir = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    window = CONFIGS[name]["sliding_window"]
    assert ours.args.sliding_window == window
    tokens = random_tokens(2, SEQ)
    assert max_logit_diff(hf_model, ours, tokens) <= TOLERANCE
    if window is not None:  # the window is really exercised: without it the logits differ
        for layer in ours.layers:
            layer.attn.sliding_window = None
        assert max_logit_diff(hf_model, ours, tokens) > 1e-2


@pytest.mark.parametrize("name", ["window_gqa_untied", "no_window_mha_tied"])
def test_saved_output_reloads_in_transformers(tmp_path, name):
    _, hf_dir = _hf(tmp_path, name)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, "MistralForCausalLM", seq=SEQ)


def test_cached_decoding_with_window_matches_transformers(tmp_path):
    """Chunked prefill then one token at a time through the KV cache, past the window."""
    hf_model, hf_dir = _hf(tmp_path, "window_gqa_untied")
    ours = load_pretrained(hf_dir)
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        want = hf_model(tokens).logits
        ours.setup_caches(2, SEQ)
        got = [ours(tokens[:, :10], cache_pos=0), ours(tokens[:, 10:30], cache_pos=10)]
        got += [ours(tokens[:, t:t + 1], cache_pos=t) for t in range(30, SEQ)]
    assert (torch.cat(got, dim=1) - want).abs().max().item() <= TOLERANCE


def test_padding_free_batch_with_window_matches_transformers(tmp_path):
    """Two sequences laid end to end (seq_lens) each see only their own window."""
    hf_model, hf_dir = _hf(tmp_path, "window_wide_heads")
    ours = load_pretrained(hf_dir)
    a, b = random_tokens(1, 30, seed=3), random_tokens(1, 21, seed=4)
    positions = torch.cat([torch.arange(30), torch.arange(21)])[None]
    with torch.no_grad():
        got = ours(torch.cat([a, b], dim=1), input_pos=positions, seq_lens=[30, 21])
        want = torch.cat([hf_model(a).logits, hf_model(b).logits], dim=1)
    assert got.shape == (1, 51, VOCAB)
    assert (got - want).abs().max().item() <= TOLERANCE
