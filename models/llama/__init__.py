"""Llama 2, Llama 3 / 3.1 / 3.2 and SmolLM2: the generic decoder exactly, so only data here."""

from __future__ import annotations

from typing import Any

from tunewright.models.args import ModelArgs
from tunewright.models.family import Family, rope_scaling, rope_theta, shape_from_hf, shape_to_hf
from tunewright.models.weight_map import WeightMap

_LLAMA3_1_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_2_ROPE = {**_LLAMA3_1_ROPE, "factor": 32.0}

_L = ModelArgs(family="llama", vocab_size=128256, dim=4096, num_layers=32, num_heads=32,
               num_kv_heads=8, intermediate_dim=14336, rope_base=500000.0, max_seq_len=8192)

SIZES: dict[str, ModelArgs] = {
    "llama2_7b": _L.replace(vocab_size=32000, num_kv_heads=32, intermediate_dim=11008,
                            rope_base=10000.0, max_seq_len=4096),
    "llama3_8b": _L,
    "llama3_1_8b": _L.replace(rope_scaling=_LLAMA3_1_ROPE, max_seq_len=131072),
    "llama3_1_70b": _L.replace(dim=8192, num_layers=80, num_heads=64, intermediate_dim=28672,
                               rope_scaling=_LLAMA3_1_ROPE, max_seq_len=131072),
    "llama3_2_1b": _L.replace(dim=2048, num_layers=16, intermediate_dim=8192, head_dim=64,
                              rope_scaling=_LLAMA3_2_ROPE, max_seq_len=131072, tie_embeddings=True),
    "llama3_2_3b": _L.replace(dim=3072, num_layers=28, num_heads=24, intermediate_dim=8192,
                              head_dim=128, rope_scaling=_LLAMA3_2_ROPE, max_seq_len=131072,
                              tie_embeddings=True),
    "smollm2_135m": _L.replace(vocab_size=49152, dim=576, num_layers=30, num_heads=9,
                               num_kv_heads=3, intermediate_dim=1536, rope_base=100000.0,
                               tie_embeddings=True),
    "smollm2_360m": _L.replace(vocab_size=49152, dim=960, num_layers=32, num_heads=15,
                               num_kv_heads=5, intermediate_dim=2560, rope_base=100000.0,
                               tie_embeddings=True),
    "smollm2_1_7b": _L.replace(vocab_size=49152, dim=2048, num_layers=24, num_heads=32,
                               num_kv_heads=32, intermediate_dim=8192, rope_base=130000.0,
                               tie_embeddings=True),
}

WEIGHTS = WeightMap([
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q_proj.weight"),
    ("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attn.k_proj.weight"),
    ("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attn.v_proj.weight"),
    ("model.layers.{}.self_attn.q_proj.bias", "layers.{}.attn.q_proj.bias"),
    ("model.layers.{}.self_attn.k_proj.bias", "layers.{}.attn.k_proj.bias"),
    ("model.layers.{}.self_attn.v_proj.bias", "layers.{}.attn.v_proj.bias"),
    ("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.weight"),
    ("model.layers.{}.self_attn.o_proj.bias", "layers.{}.attn.o_proj.bias"),
    ("model.layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.gate_proj.weight"),
    ("model.layers.{}.mlp.up_proj.weight", "layers.{}.mlp.up_proj.weight"),
    ("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.down_proj.weight"),
    ("model.layers.{}.mlp.gate_proj.bias", "layers.{}.mlp.gate_proj.bias"),
    ("model.layers.{}.mlp.up_proj.bias", "layers.{}.mlp.up_proj.bias"),
    ("model.layers.{}.mlp.down_proj.bias", "layers.{}.mlp.down_proj.bias"),
    ("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
])


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    return ModelArgs(
        **shape_from_hf(c, "llama"),
        rope_base=rope_theta(c),
        rope_scaling=rope_scaling(c),
        attn_bias=bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
    )


def hf_config(a: ModelArgs) -> dict[str, Any]:
    return {
        **shape_to_hf(a, "llama", "LlamaForCausalLM"),
        "hidden_act": "silu",
        "rope_theta": a.rope_base,
        "rope_scaling": a.rope_scaling,
        "attention_bias": a.attn_bias,
        "mlp_bias": a.mlp_bias,
    }


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    architecture="LlamaForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    tiny=ModelArgs(family="llama", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_dim=256, max_seq_len=2048, norm_eps=1e-5),
)
