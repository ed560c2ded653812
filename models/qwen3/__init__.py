"""Qwen3 (dense): Qwen2's config with RMSNorm on each q/k head (`qk_norm`), one switch for all
four attention biases, and head_dim set apart from dim / num_heads. Only data here."""

from __future__ import annotations

from typing import Any

from tunewright.models.args import ModelArgs
from tunewright.models.family import Family
from tunewright.models.llama import WEIGHTS as LLAMA_WEIGHTS
from tunewright.models.qwen2 import common_args_from_hf, common_hf_config
from tunewright.models.weight_map import WeightMap

# Qwen3 post-trained checkpoints (Qwen/Qwen3-*); 0.6B-4B tie the head to the embeddings.
_Q = ModelArgs(family="qwen3", vocab_size=151936, dim=1024, num_layers=28, num_heads=16,
               num_kv_heads=8, intermediate_dim=3072, head_dim=128, norm_eps=1e-6,
               rope_base=1000000.0, max_seq_len=40960, tie_embeddings=True, qk_norm=True)

SIZES: dict[str, ModelArgs] = {
    "qwen3_0_6b": _Q,
    "qwen3_1_7b": _Q.replace(dim=2048, intermediate_dim=6144),
    "qwen3_4b": _Q.replace(dim=2560, num_layers=36, num_heads=32, intermediate_dim=9728),
    "qwen3_8b": _Q.replace(dim=4096, num_layers=36, num_heads=32, intermediate_dim=12288,
                           tie_embeddings=False),
}

WEIGHTS = WeightMap([
    *LLAMA_WEIGHTS.pairs,
    ("model.layers.{}.self_attn.q_norm.weight", "layers.{}.attn.q_norm.weight"),
    ("model.layers.{}.self_attn.k_norm.weight", "layers.{}.attn.k_norm.weight"),
])


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    bias = bool(c.get("attention_bias", False))
    # Qwen3Config's head_dim defaults to 128, not hidden_size // num_attention_heads.
    return common_args_from_hf({"head_dim": 128, **c}, "qwen3").replace(
        qk_norm=True, attn_bias=bias, attn_out_bias=bias)


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if not a.qk_norm or a.resolved_out_bias != a.attn_bias:
        raise ValueError("qwen3 checkpoints have q/k norms and one attention_bias switch for "
                         "q/k/v/o; this model differs")
    return {**common_hf_config(a, "qwen3", "Qwen3ForCausalLM"), "attention_bias": a.attn_bias}


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    architecture="Qwen3ForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # q/k norms, GQA, an untied head, and num_heads * head_dim != dim (as in Qwen3-0.6B to 4B).
    tiny=ModelArgs(family="qwen3", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_dim=256, head_dim=64, norm_eps=1e-6,
                   rope_base=1000000.0, max_seq_len=2048, qk_norm=True),
)
