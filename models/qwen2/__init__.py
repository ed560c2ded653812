"""Qwen2 / Qwen2.5: the generic decoder with q/k/v biases (no o_proj bias), so only data here.

The sliding-window fields are shared with Qwen3 (`models/qwen3`), whose config has the same ones.
"""

from __future__ import annotations

from typing import Any

from tunewright.models.args import FULL, SLIDING, ModelArgs
from tunewright.models.family import Family, rope_scaling, rope_theta, shape_from_hf, shape_to_hf
from tunewright.models.llama import WEIGHTS as LLAMA_WEIGHTS

# Qwen2.5 Instruct checkpoints (Qwen/Qwen2.5-*-Instruct); 0.5B-3B tie the head to the embeddings.
_Q = ModelArgs(family="qwen2", vocab_size=151936, dim=896, num_layers=24, num_heads=14,
               num_kv_heads=2, intermediate_dim=4864, norm_eps=1e-6, rope_base=1000000.0,
               max_seq_len=32768, tie_embeddings=True, attn_bias=True, attn_out_bias=False)

SIZES: dict[str, ModelArgs] = {
    "qwen2_5_0_5b": _Q,
    "qwen2_5_1_5b": _Q.replace(dim=1536, num_layers=28, num_heads=12, intermediate_dim=8960),
    "qwen2_5_3b": _Q.replace(dim=2048, num_layers=36, num_heads=16, intermediate_dim=11008),
    # 7B and up pad the vocabulary to 152064 and have their own head.
    "qwen2_5_7b": _Q.replace(vocab_size=152064, dim=3584, num_layers=28, num_heads=28,
                             num_kv_heads=4, intermediate_dim=18944, tie_embeddings=False),
}

WEIGHTS = LLAMA_WEIGHTS  # same tensor names; which biases exist follows from the args


def sliding_from_hf(c: dict[str, Any]) -> dict[str, Any]:
    """`sliding_window` and `layer_types` from a Qwen2/Qwen3 config.json, as transformers reads
    them: the window only counts with `use_sliding_window`; without `layer_types` (configs older
    than transformers 5), layers from `max_window_layers` on slide."""
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    n = c["num_hidden_layers"]
    types = c.get("layer_types") or [SLIDING if i >= c.get("max_window_layers", 28) else FULL
                                     for i in range(n)]
    if len(types) != n or not set(types) <= {FULL, SLIDING}:
        raise ValueError(f"config.json: layer_types must list '{FULL}' or '{SLIDING}' for each "
                         f"of the {n} layers, got {types}")
    return {"sliding_window": int(window), "layer_types": tuple(types)}


def sliding_to_hf(a: ModelArgs) -> dict[str, Any]:
    types = [a.layer_type(i) for i in range(a.num_layers)]
    if a.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": a.num_layers}
    # Older transformers read only max_window_layers (the first sliding layer); newer, layer_types.
    first_sliding = types.index(SLIDING) if SLIDING in types else a.num_layers
    return {"use_sliding_window": True, "sliding_window": a.sliding_window,
            "max_window_layers": first_sliding, "layer_types": types}


def common_args_from_hf(c: dict[str, Any], family: str) -> ModelArgs:
    """The fields Qwen2 and Qwen3 configs share (defaults: transformers' Qwen2Config/Qwen3Config)."""
    return ModelArgs(**shape_from_hf(c, family, max_seq_len=32768), rope_base=rope_theta(c),
                     rope_scaling=rope_scaling(c), **sliding_from_hf(c))


def common_hf_config(a: ModelArgs, model_type: str, architecture: str) -> dict[str, Any]:
    if a.activation != "silu" or a.mlp_bias:
        raise ValueError(f"{model_type} checkpoints have a bias-free SwiGLU MLP; this model has "
                         f"activation={a.activation}, mlp_bias={a.mlp_bias}")
    return {**shape_to_hf(a, model_type, architecture), "hidden_act": "silu",
            "rope_theta": a.rope_base, "rope_scaling": a.rope_scaling, **sliding_to_hf(a)}


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    # Qwen2Config has no bias switch: q/k/v always have biases, o_proj never.
    return common_args_from_hf(c, "qwen2").replace(attn_bias=True, attn_out_bias=False)


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if not a.attn_bias or a.resolved_out_bias or a.qk_norm:
        raise ValueError("qwen2 checkpoints have q/k/v biases, no o_proj bias and no q/k norms; "
                         "this model differs (use attn_bias=True, attn_out_bias=False)")
    return common_hf_config(a, "qwen2", "Qwen2ForCausalLM")


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    architecture="Qwen2ForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # Biases, tied head, GQA, and a window on the last two layers (transformers applies it).
    tiny=ModelArgs(family="qwen2", vocab_size=288, dim=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, intermediate_dim=256, norm_eps=1e-6, rope_base=1000000.0,
                   max_seq_len=2048, tie_embeddings=True, attn_bias=True, attn_out_bias=False,
                   sliding_window=16, layer_types=(FULL, SLIDING, SLIDING)),
)
