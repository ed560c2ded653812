"""Tensor names in a GGUF file (llama.cpp) and in a Hugging Face checkpoint, both directions.

One table per layout, GGUF name (inside `blk.N`) -> HF name (inside `model.layers.N`); the
importer (`gguf_import.py`) reads Llama files with `LAYER_NAMES`, the exporter
(`gguf_export.py`) inverts the table of each family (`gguf_arch.py`). The names are
llama.cpp's (`gguf-py`'s `TensorNameMap`, which tests check these against).
"""

from __future__ import annotations

# Llama's block, also Mistral's, Qwen2/3's attention and Gemma 1's.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 rope scaling as per-frequency divisors
# Phi-3's LongRoPE factors, one per rotary frequency.
ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"

QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}  # Qwen3, Gemma-3
# Gemma 2/3: HF's post_attention_layernorm normalises the attention output, not the MLP input.
SANDWICH_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps q/k/v and gate/up fused, in HF's row order; llama.cpp splits them when loading.
PHI3_NAMES = {
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Mixture of experts: the router, and each projection's experts stacked into one 3-D tensor
# (`{}` is the expert in the HF name).
MIXTRAL_EXPERT_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{}.w3", "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
}
QWEN_EXPERT_NAMES = {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj", "ffn_down_exps": "mlp.experts.{}.down_proj",
}


def without_mlp(names: dict[str, str]) -> dict[str, str]:
    """A layout's attention and norms only (an MoE block replaces the dense MLP)."""
    return {g: h for g, h in names.items() if g not in ("ffn_gate", "ffn_up", "ffn_down")}
