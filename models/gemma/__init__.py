"""Gemma 1, Gemma 2 and Gemma 3 (text): the generic decoder with Gemma's options, so only data.

What sets them apart, all `ModelArgs` fields: embeddings times sqrt(dim), `(1 + weight)` RMSNorms
(checkpoints store weight - 1), GeGLU; Gemma 2 adds sandwich norms, a query scale from
`query_pre_attn_scalar`, tanh soft-caps on attention scores and logits, and sliding-window
layers alternating with global ones; Gemma 3 drops the soft-caps (optional), adds q/k norms, a
5 local : 1 global layer pattern and a separate RoPE base for local layers.

Gemma-3 4B/12B/27B ship only as multimodal checkpoints (model_type `gemma3`); their text model
is the same decoder, read from `text_config` and the `language_model.` tensors, the vision tower
skipped, and saved back as a text-only `gemma3_text` checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from tunewright.models.args import FULL, SLIDING, ModelArgs
from tunewright.models.family import Family, rope_scaling, rope_theta, shape_from_hf, shape_to_hf
from tunewright.models.weight_map import WeightMap

_ATTN_MLP = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q_proj.weight"),
    ("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attn.k_proj.weight"),
    ("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attn.v_proj.weight"),
    ("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.weight"),
    ("model.layers.{}.self_attn.q_proj.bias", "layers.{}.attn.q_proj.bias"),
    ("model.layers.{}.self_attn.k_proj.bias", "layers.{}.attn.k_proj.bias"),
    ("model.layers.{}.self_attn.v_proj.bias", "layers.{}.attn.v_proj.bias"),
    ("model.layers.{}.self_attn.o_proj.bias", "layers.{}.attn.o_proj.bias"),
    ("model.layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.gate_proj.weight"),
    ("model.layers.{}.mlp.up_proj.weight", "layers.{}.mlp.up_proj.weight"),
    ("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.down_proj.weight"),
    ("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
GEMMA_WEIGHTS = WeightMap([
    *_ATTN_MLP,
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
])
# Gemma 2/3's "post_attention_layernorm" normalises the attention output (a sandwich norm), not
# the MLP input as in Gemma 1 and Llama: the same HF name maps to a different norm of ours.
_SANDWICH = [
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.post_attn_norm.weight"),
    ("model.layers.{}.pre_feedforward_layernorm.weight", "layers.{}.mlp_norm.weight"),
    ("model.layers.{}.post_feedforward_layernorm.weight", "layers.{}.post_mlp_norm.weight"),
]
GEMMA2_WEIGHTS = WeightMap([*_ATTN_MLP, *_SANDWICH])
GEMMA3_WEIGHTS = WeightMap(
    [
        *_ATTN_MLP, *_SANDWICH,
        ("model.layers.{}.self_attn.q_norm.weight", "layers.{}.attn.q_norm.weight"),
        ("model.layers.{}.self_attn.k_norm.weight", "layers.{}.attn.k_norm.weight"),
    ],
    # Gemma3ForConditionalGeneration's text model: the Hub checkpoints (and transformers 5's
    # save_pretrained, which reverts its renaming) store `language_model.model.*`; transformers'
    # in-memory names, which a raw state-dict dump writes, are `model.language_model.*`.
    aliases=[("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model.")],
    skip=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
)


def _gemma(family: str, *, dim: int, **fields: Any) -> ModelArgs:
    """A Gemma row: the options every generation shares, derived from `dim`."""
    base = dict(vocab_size=256000, head_dim=256, norm_eps=1e-6, max_seq_len=8192,
                tie_embeddings=True, activation="gelu_pytorch_tanh", norm_offset=1.0)
    return ModelArgs(family=family, dim=dim, embed_scale=math.sqrt(dim), **{**base, **fields})


def alternating(num_layers: int, pattern: int) -> tuple[str, ...]:
    """HF's default `layer_types`: every `pattern`-th layer global, the others sliding."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _gemma2(*, dim: int, num_layers: int, **fields: Any) -> ModelArgs:
    return _gemma("gemma2", dim=dim, num_layers=num_layers, sandwich_norms=True, attn_scale=256**-0.5,
                  attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                  layer_types=alternating(num_layers, 2), **fields)


def _gemma3(*, dim: int, num_layers: int, **fields: Any) -> ModelArgs:
    return _gemma("gemma3", dim=dim, num_layers=num_layers, sandwich_norms=True, qk_norm=True,
                  attn_scale=256**-0.5, rope_base=1e6, local_rope_base=1e4,
                  layer_types=alternating(num_layers, 6), **fields)


# Published config.json values (google/gemma-2b, gemma-7b, gemma-2-2b, gemma-2-9b, gemma-3-1b-pt,
# and the text_config of gemma-3-4b-pt, gemma-3-12b-pt and gemma-3-27b-pt).
GEMMA_SIZES = {
    "gemma_2b": _gemma("gemma", dim=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                       intermediate_dim=16384),
    "gemma_7b": _gemma("gemma", dim=3072, num_layers=28, num_heads=16, num_kv_heads=16,
                       intermediate_dim=24576),
}
GEMMA2_SIZES = {
    "gemma2_2b": _gemma2(dim=2304, num_layers=26, num_heads=8, num_kv_heads=4, intermediate_dim=9216),
    "gemma2_9b": _gemma2(dim=3584, num_layers=42, num_heads=16, num_kv_heads=8, intermediate_dim=14336),
}
GEMMA3_SIZES = {
    "gemma3_1b": _gemma3(dim=1152, num_layers=26, num_heads=4, num_kv_heads=1, intermediate_dim=6912,
                         vocab_size=262144, sliding_window=512, max_seq_len=32768),
    "gemma3_4b": _gemma3(dim=2560, num_layers=34, num_heads=8, num_kv_heads=4, intermediate_dim=10240,
                         vocab_size=262208, sliding_window=1024, max_seq_len=131072,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3_12b": _gemma3(dim=3840, num_layers=48, num_heads=16, num_kv_heads=8, intermediate_dim=15360,
                          vocab_size=262208, sliding_window=1024, max_seq_len=131072,
                          rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3_27b": _gemma3(dim=5376, num_layers=62, num_heads=32, num_kv_heads=16, intermediate_dim=21504,
                          vocab_size=262208, sliding_window=1024, max_seq_len=131072, head_dim=128,
                          rope_scaling={"rope_type": "linear", "factor": 8.0}).replace(attn_scale=168**-0.5),
}


def _reject_bidirectional(c: dict[str, Any]) -> None:
    if c.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention=true (an encoder, e.g. EmbeddingGemma) "
                         "is not supported; tunewright trains causal decoders")


def _common(c: dict[str, Any], family: str) -> dict[str, Any]:
    _reject_bidirectional(c)
    return dict(
        **shape_from_hf(c, family, head_dim=256, max_seq_len=8192, tie_embeddings=True),
        attn_bias=bool(c.get("attention_bias", False)),
        norm_offset=1.0,
        embed_scale=math.sqrt(c["hidden_size"]),
    )


def gemma_args_from_hf(c: dict[str, Any]) -> ModelArgs:
    act = c.get("hidden_act") or "gelu_pytorch_tanh"
    # transformers reads the released configs' `hidden_act: "gelu"` as the tanh approximation.
    return ModelArgs(**_common(c, "gemma"), activation="gelu_pytorch_tanh" if act == "gelu" else act,
                     rope_base=rope_theta(c), rope_scaling=rope_scaling(c))


def _layer_types(c: dict[str, Any], pattern: int) -> tuple[str, ...]:
    types = c.get("layer_types")
    if types is None:  # configs written before transformers had `layer_types`
        return alternating(c["num_hidden_layers"], pattern)
    if len(types) != c["num_hidden_layers"] or set(types) - {FULL, SLIDING}:
        raise ValueError(f"config.json: layer_types must be {c['num_hidden_layers']} of "
                         f"'{FULL}'/'{SLIDING}', got {types}")
    return tuple(types)


def _windowed(c: dict[str, Any], pattern: int) -> dict[str, Any]:
    """What Gemma 2 and 3 add to Gemma 1's fields (beyond RoPE); defaults are transformers'."""
    return dict(
        activation=c.get("hidden_activation") or "gelu_pytorch_tanh",
        sandwich_norms=True,
        attn_scale=float(c.get("query_pre_attn_scalar") or 256) ** -0.5,
        sliding_window=c.get("sliding_window", 4096),
        layer_types=_layer_types(c, pattern),
    )


def gemma2_args_from_hf(c: dict[str, Any]) -> ModelArgs:
    return ModelArgs(
        **_common(c, "gemma2"), **_windowed(c, 2), rope_base=rope_theta(c), rope_scaling=rope_scaling(c),
        # Absent keys are transformers' defaults (50 and 30), an explicit null switches them off.
        attn_softcap=c.get("attn_logit_softcapping", 50.0),
        final_softcap=c.get("final_logit_softcapping", 30.0),
    )


def _gemma3_rope(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(global base, global scaling, local base), from transformers 5's per-layer-type
    `rope_parameters` or the released configs' rope_theta / rope_scaling / rope_local_base_freq."""
    params = c.get("rope_parameters") or {}
    full = dict(params.get(FULL) or {"rope_theta": c.get("rope_theta", 1e6), **(c.get("rope_scaling") or {})})
    local = dict(params.get(SLIDING) or {"rope_theta": c.get("rope_local_base_freq", 1e4)})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"config.json: RoPE scaling on sliding-window layers is not supported ({local})")
    base = float(full.pop("rope_theta", 1e6))
    kind = full.get("rope_type", full.get("type", "default"))
    return base, (full if kind != "default" else None), float(local.get("rope_theta", 1e4))


GEMMA3_MULTIMODAL = ("gemma3",)  # Gemma3ForConditionalGeneration
# Gemma3TextConfig's defaults, which a sparse config.json relies on: the released multimodal
# configs' `text_config` lists only what differs (gemma-3-4b: sizes, layers, window, RoPE scaling).
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
)


def gemma3_text_config(c: dict[str, Any]) -> dict[str, Any]:
    """The text model's config with defaults filled: `c` itself, or a multimodal config's
    `text_config`."""
    if c.get("model_type") not in GEMMA3_MULTIMODAL:
        return {**_GEMMA3_TEXT_DEFAULTS, **c}
    text = c.get("text_config") or {}
    # Gemma3ForConditionalGeneration ties its head by the top-level flag, not text_config's.
    return {**_GEMMA3_TEXT_DEFAULTS, **text, "tie_word_embeddings": c.get("tie_word_embeddings", True)}


def gemma3_args_from_hf(c: dict[str, Any]) -> ModelArgs:
    c = gemma3_text_config(c)
    base, scaling, local_base = _gemma3_rope(c)
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
    return ModelArgs(
        **_common(c, "gemma3"), **_windowed(c, pattern), qk_norm=True, rope_base=base,
        rope_scaling=scaling, local_rope_base=local_base, final_softcap=c.get("final_logit_softcapping"),
        # No attention soft-cap: transformers' Gemma3Attention never passes
        # `attn_logit_softcapping` on (null in every released config), so the checkpoints do without.
    )


def _query_pre_attn_scalar(a: ModelArgs) -> int | float:
    if a.attn_scale is None:
        return a.resolved_head_dim
    scalar = a.attn_scale**-2
    return round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar  # HF types it int


def _hf_common(a: ModelArgs, architecture: str, model_type: str) -> dict[str, Any]:
    return {**shape_to_hf(a, model_type, architecture), "attention_bias": a.attn_bias}


def gemma_hf_config(a: ModelArgs) -> dict[str, Any]:
    return {**_hf_common(a, "GemmaForCausalLM", "gemma"), "hidden_act": a.activation,
            "rope_theta": a.rope_base, "rope_scaling": a.rope_scaling}


def _hf_windowed(a: ModelArgs) -> dict[str, Any]:
    return {
        "hidden_activation": a.activation,
        "query_pre_attn_scalar": _query_pre_attn_scalar(a),
        "sliding_window": a.sliding_window,
        "layer_types": [a.layer_type(i) for i in range(a.num_layers)],
        "attn_logit_softcapping": a.attn_softcap,
        "final_logit_softcapping": a.final_softcap,
    }


def gemma2_hf_config(a: ModelArgs) -> dict[str, Any]:
    return {**_hf_common(a, "Gemma2ForCausalLM", "gemma2"), **_hf_windowed(a),
            "rope_theta": a.rope_base, "rope_scaling": a.rope_scaling}


def gemma3_hf_config(a: ModelArgs) -> dict[str, Any]:
    if a.attn_softcap is not None:
        raise ValueError("Gemma-3 in transformers has no attention soft-cap; attn_softcap must be None")
    # The released configs' RoPE keys, which transformers 4.5x and 5 both read.
    return {**_hf_common(a, "Gemma3ForCausalLM", "gemma3_text"), **_hf_windowed(a),
            "rope_theta": a.rope_base, "rope_scaling": a.rope_scaling,
            "rope_local_base_freq": a.local_rope_base if a.local_rope_base is not None else a.rope_base}


_TINY = dict(vocab_size=288, dim=128, num_heads=4, head_dim=32, intermediate_dim=256, max_seq_len=2048)

GEMMA = Family(
    name="gemma",
    model_types=("gemma",),
    architecture="GemmaForCausalLM",
    sizes=GEMMA_SIZES,
    weight_map=GEMMA_WEIGHTS,
    args_from_hf=gemma_args_from_hf,
    hf_config=gemma_hf_config,
    tiny=_gemma("gemma", **_TINY, num_layers=2, num_kv_heads=1),
)
GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2",),
    architecture="Gemma2ForCausalLM",
    sizes=GEMMA2_SIZES,
    weight_map=GEMMA2_WEIGHTS,
    args_from_hf=gemma2_args_from_hf,
    hf_config=gemma2_hf_config,
    # A window shorter than the test sequences, and a query scale other than head_dim ** -0.5.
    tiny=_gemma2(**_TINY, num_layers=2, num_kv_heads=2).replace(sliding_window=16, attn_scale=24**-0.5),
)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    architecture="Gemma3ForCausalLM",
    sizes=GEMMA3_SIZES,
    weight_map=GEMMA3_WEIGHTS,
    args_from_hf=gemma3_args_from_hf,
    hf_config=gemma3_hf_config,
    multimodal_types=GEMMA3_MULTIMODAL,
    # Two sliding layers then a global one with linear RoPE scaling, as in Gemma-3 4B.
    tiny=_gemma3(**_TINY, num_layers=3, num_kv_heads=2).replace(
        sliding_window=16, layer_types=alternating(3, 3),
        rope_scaling={"rope_type": "linear", "factor": 8.0}),
)
FAMILIES = [GEMMA, GEMMA2, GEMMA3]
