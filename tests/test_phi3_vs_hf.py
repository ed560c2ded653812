"""Our Phi-3 / Phi-4 decoder against transformers' Phi3ForCausalLM, through the fused weight map
(qkv_proj, gate_up_proj), with LongRoPE on both sides of original_max_position_embeddings."""

from __future__ import annotations

import pytest
import torch

from tests.hf_reference import (TOLERANCE, assert_saved_reloads, make_hf_model, max_logit_diff,
                                random_tokens)
from tunewright.models import load_pretrained
from tunewright.models.phi3 import FAMILY, args_from_hf
from tunewright.modules.rope import RotaryEmbedding

transformers = pytest.importorskip("transformers")

ORIGINAL = 32  # original_max_position_embeddings: test sequences cross it
_IDS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # Phi3Config's default pad 32000 > vocab
_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **_IDS)


def _factors(n: int, start: float, step: float) -> list[float]:
    return [start + step * i for i in range(n)]


CONFIGS = {
    "plain_untied": dict(_BASE, num_key_value_heads=4, tie_word_embeddings=False),
    # Phi-4-mini's shape: GQA, 3/4 partial rotary (head 16 -> 12 rotated, 6 factors), LongRoPE
    # with factor = max / original (attention factor derived), tied head
    "longrope_partial_tied": dict(
        _BASE, num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        max_position_embeddings=256, original_max_position_embeddings=ORIGINAL,
        rope_scaling={"type": "longrope", "short_factor": _factors(6, 1.0, 0.2),
                      "long_factor": _factors(6, 1.5, 3.0)}),
    # LongRoPE with an explicit attention factor, full rotary, untied, one kv head
    "longrope_attention_factor": dict(
        _BASE, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=50000.0,
        max_position_embeddings=512, original_max_position_embeddings=ORIGINAL,
        rope_scaling={"rope_type": "longrope", "attention_factor": 1.3,
                      "short_factor": _factors(8, 1.0, 0.1), "long_factor": _factors(8, 2.0, 5.0)}),
    # Phi-3-mini-4k's sliding window (2,047 there), which transformers 5 applies
    "sliding_window": dict(_BASE, num_key_value_heads=2, sliding_window=20),
}
LONGROPE = [name for name, c in CONFIGS.items() if "rope_scaling" in c]


def _hf(tmp_path, name):
    return make_hf_model(tmp_path, "Phi3Config", "Phi3ForCausalLM", **CONFIGS[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf_model, hf_dir = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    assert max_logit_diff(hf_model, ours, random_tokens(2, 80)) <= TOLERANCE


# 32 positions end at 31 (short factors), 33 reach 32 (long): transformers switches when the
# longest sequence (max position + 1) exceeds the original context.
@pytest.mark.parametrize("seq", [20, ORIGINAL, ORIGINAL + 1, 80])
@pytest.mark.parametrize("name", LONGROPE)
def test_longrope_below_and_above_the_original_context(tmp_path, name, seq):
    hf_model, hf_dir = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    assert max_logit_diff(hf_model, ours, random_tokens(2, seq)) <= TOLERANCE


def test_longrope_picks_factors_from_the_batch_positions(tmp_path):
    """Row 0 stays under the original context, row 1 passes it: the long factors apply to both."""
    hf_model, hf_dir = _hf(tmp_path, "longrope_partial_tied")
    ours = load_pretrained(hf_dir)
    tokens = random_tokens(2, 20)
    positions = torch.stack([torch.arange(20), torch.arange(15, 35)])
    with torch.no_grad():
        want = hf_model(tokens, position_ids=positions).logits
        got = ours(tokens, input_pos=positions)
    assert (got - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["plain_untied", "longrope_partial_tied"])
def test_saved_output_reloads_in_transformers(tmp_path, name):
    _, hf_dir = _hf(tmp_path, name)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, "Phi3ForCausalLM", seq=2 * ORIGINAL)


@pytest.mark.parametrize("size", ["phi3_5_mini", "phi4_mini"])
def test_real_size_rope_equals_transformers(size):
    """The published LongRoPE configs (legacy "type": "longrope", no factor) read by us and by
    Phi3Config give the same cos/sin at positions up to and past 4,096."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    row = FAMILY.sizes[size]
    config = FAMILY.hf_config(row)
    scaling = config["rope_scaling"]
    config["rope_scaling"] = {"type": "longrope", "short_factor": scaling["short_factor"],
                              "long_factor": scaling["long_factor"]}
    ours_args = args_from_hf(config)
    ours = RotaryEmbedding(ours_args.resolved_head_dim, base=ours_args.rope_base,
                           scaling=ours_args.rope_scaling, rotary_dim=ours_args.rotary_dim)
    theirs = Phi3RotaryEmbedding(transformers.Phi3Config(**config))
    for end in (4096, 4097, 9000):
        positions = torch.arange(end - 64, end)[None]
        want_cos, want_sin = theirs(torch.zeros(1, dtype=torch.float32), positions)
        cos, sin = ours.cos_sin(positions, torch.float32)
        assert 2 * cos.shape[-1] == want_cos.shape[-1]  # the same rotary dims
        # transformers repeats the cos/sin of each frequency for both halves of a head
        half = cos.shape[-1]
        torch.testing.assert_close(cos, want_cos[..., :half], rtol=0, atol=1e-5)
        torch.testing.assert_close(sin, want_sin[..., :half], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", LONGROPE)
def test_generation_across_the_original_context_equals_transformers(tmp_path, name):
    """Greedy KV-cache decoding that starts under the original context and ends past it: at
    every step our logits equal transformers' full forward over the sequence so far (which
    rotates every position with the long factors once the sequence outgrows the original
    context, so cached keys must be recomputed then, as transformers' `generate` does), and the
    tokens equal transformers' `generate`."""
    from tunewright.training.generation import _decode_group

    hf_model, hf_dir = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir).eval()
    prompt = random_tokens(1, ORIGINAL - 12, seed=3)
    new = 30  # the sequence passes ORIGINAL positions at step 12
    seen: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return logits.argmax(-1)

    with torch.no_grad():
        got = _decode_group(ours, prompt, [0], max_new_tokens=new, stops=frozenset(), pad_id=0,
                            on_token=None, pick=pick)[0]
        seq = torch.cat([prompt, torch.tensor([got])], dim=1)
        for step, logits in enumerate(seen):
            full = hf_model(seq[:, : prompt.shape[1] + step]).logits[:, -1]
            assert (logits - full).abs().max().item() <= TOLERANCE, f"step {step}"
        want = hf_model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    assert got == want[0, prompt.shape[1]:].tolist()
