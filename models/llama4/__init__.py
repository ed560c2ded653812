"""Llama 4 (text): Scout (17B-16E) and Maverick (17B-128E) as data on the generic decoder.

What sets Llama 4 apart, all `ModelArgs` fields the generic modules read:
- mixture-of-experts layers (all of Scout's, every other one of Maverick's: `moe_layers` /
  `interleave_moe_layer_step`) with top-1 routing by a sigmoid score that scales the token
  *before* its expert sees it, plus an always-on shared expert; the other layers keep a dense
  MLP of `intermediate_size_mlp`;
- every fourth layer global and without RoPE (`no_rope_layers`, 0 = NoPE), its queries scaled
  by a temperature growing with the position (`attn_temperature_tuning`, `floor_scale`,
  `attn_scale`); the RoPE layers attend within chunks of `attention_chunk_size` positions;
- RoPE in Meta's complex form (adjacent pairs), "llama3" frequency scaling on Scout;
- on RoPE layers a q/k norm without weight (`use_qk_norm`: Scout yes, Maverick no), which we
  apply before RoPE: a rotation keeps the norm, so the two orders agree.

The published checkpoints are multimodal (Llama4ForConditionalGeneration, model_type
`llama4`): their text model is read from `text_config` and the `language_model.` tensors, the
vision model skipped, and saved back as a text-only Llama4ForCausalLM (`llama4_text`). Experts
are stored as transformers holds them, `experts.gate_up_proj` [E, dim, 2 hidden] and
`experts.down_proj` [E, hidden, dim], which the weight map's `stacked` rule turns into our
stacked [E, out, in] weights and back.
"""

from __future__ import annotations

from typing import Any

from tunewright.models.args import CHUNKED, FULL, ModelArgs
from tunewright.models.family import Family, rope_scaling, rope_theta, shape_from_hf, shape_to_hf
from tunewright.models.weight_map import WeightMap

_ATTN = "model.layers.{}.self_attn"
_FF = "model.layers.{}.feed_forward"

WEIGHTS = WeightMap(
    [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        *((f"{_ATTN}.{p}_proj.{kind}", f"layers.{{}}.attn.{p}_proj.{kind}")
          for p in "qkvo" for kind in ("weight", "bias")),
        ("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
        ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
        *((f"{_FF}.{p}.weight", f"layers.{{}}.mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")),
        *((f"{_FF}.shared_expert.{p}.weight", f"layers.{{}}.mlp.shared_expert.{p}.weight")
          for p in ("gate_proj", "up_proj", "down_proj")),
        (f"{_FF}.router.weight", "layers.{}.mlp.router.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
    stacked=[
        (f"{_FF}.experts.gate_up_proj", ("layers.{}.mlp.experts.gate_proj", "layers.{}.mlp.experts.up_proj")),
        (f"{_FF}.experts.down_proj", ("layers.{}.mlp.experts.down_proj",)),
    ],
    # Llama4ForConditionalGeneration holds its text model as `language_model` (a whole
    # Llama4ForCausalLM), in memory and on the Hub alike.
    aliases=[("language_model.", "")],
    skip=("vision_model.", "multi_modal_projector."),
)

MULTIMODAL = ("llama4",)  # Llama4ForConditionalGeneration
# Llama4TextConfig's defaults, which a sparse config.json relies on.
_TEXT_DEFAULTS = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, num_local_experts=16,
    num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layer_interval=4,
    attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
    hidden_act="silu",
)
# What a config.json may hold that these checkpoints' weights do not mean in bf16/fp32 terms.
_QUANTIZED = "quantization_config"


def text_config(c: dict[str, Any]) -> dict[str, Any]:
    """The text model's config with defaults filled: `c`, or a multimodal config's `text_config`."""
    if c.get("model_type") in MULTIMODAL:
        if not isinstance(c.get("text_config"), dict):
            raise ValueError("a llama4 (multimodal) config.json needs a 'text_config' to read the text "
                             "model from; a vision-only checkpoint has no text model to fine-tune")
        c = {**c["text_config"], **({_QUANTIZED: c[_QUANTIZED]} if _QUANTIZED in c else {})}
    return {**_TEXT_DEFAULTS, **c}


def _rope_flags(c: dict[str, Any]) -> list[int]:
    """transformers' `no_rope_layers`: 1 = RoPE, 0 = NoPE; empty or absent: every interval-th NoPE."""
    n, flags = c["num_hidden_layers"], c.get("no_rope_layers")
    if not flags:
        return [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(n)]
    if len(flags) != n or set(flags) - {0, 1}:
        raise ValueError(f"no_rope_layers must be {n} flags of 0 (NoPE) or 1 (RoPE), got {flags}")
    return list(flags)


def _moe_layers(c: dict[str, Any]) -> set[int]:
    n = c["num_hidden_layers"]
    if c.get("moe_layers") is not None:
        layers = set(c["moe_layers"])
        if not layers <= set(range(n)):
            raise ValueError(f"moe_layers must be layer indices below num_hidden_layers = {n}, got {c['moe_layers']}")
        return layers
    step = c["interleave_moe_layer_step"]
    return set(range(step - 1, n, step))


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    c = text_config(config)
    if c.get(_QUANTIZED):
        method = c[_QUANTIZED].get("quant_method", "?") if isinstance(c[_QUANTIZED], dict) else "?"
        raise ValueError(f"a quantized Llama 4 checkpoint ({_QUANTIZED}: {method}, e.g. Maverick's FP8 "
                         f"release) cannot be fine-tuned here; use the bf16 checkpoint (QLoRA quantizes it)")
    rope = _rope_flags(c)
    chunk = c.get("attention_chunk_size")
    types = c.get("layer_types") or [CHUNKED if r and chunk is not None else FULL for r in rope]
    moe = _moe_layers(c)
    # Our intermediate_dim is the dense layers' MLP; intermediate_size is each expert's.
    shape = {**shape_from_hf(c, "llama4"), "intermediate_dim": c["intermediate_size_mlp"]}
    return ModelArgs(
        **shape,
        rope_base=rope_theta(c, 500000.0),
        rope_scaling=rope_scaling(c),
        rope_interleaved=True,
        attn_bias=bool(c.get("attention_bias", False)),
        activation=c["hidden_act"],
        qk_norm=bool(c["use_qk_norm"]),
        qk_norm_weight=False,
        nope_layers=tuple(i for i, r in enumerate(rope) if not r),
        layer_types=tuple(types),
        attn_chunk_size=chunk,
        # The released configs say `attn_temperature_tuning: 4`: any true value switches it on.
        attn_temperature=(c["floor_scale"], c["attn_scale"]) if c["attn_temperature_tuning"] else None,
        num_experts=c["num_local_experts"] if moe else 0,
        experts_per_token=c["num_experts_per_tok"],
        expert_dim=c["intermediate_size"],
        shared_expert_dim=c["intermediate_size"],
        norm_topk_prob=False,
        router_scoring="sigmoid",
        router_weights_inputs=True,
        dense_layers=tuple(i for i in range(c["num_hidden_layers"]) if i not in moe),
    )


def hf_config(a: ModelArgs) -> dict[str, Any]:
    moe = [i for i in range(a.num_layers) if a.is_moe_layer(i)]
    expert_dim = a.expert_dim or a.intermediate_dim
    if (not a.rope_interleaved or a.sliding_window is not None or (a.qk_norm and a.qk_norm_weight)
            or a.resolved_out_bias != a.attn_bias or a.mlp_bias or a.attn_scale is not None
            or (moe and (a.router_scoring != "sigmoid" or not a.router_weights_inputs or a.norm_topk_prob
                         or a.shared_expert_dim != expert_dim))):
        raise ValueError("llama4 checkpoints have interleaved RoPE, no sliding window, weightless q/k norms, "
                         "one attention_bias switch, sigmoid-routed experts on scaled inputs and a shared "
                         "expert as wide as each expert; this model differs")
    return {
        **shape_to_hf(a, "llama4_text", "Llama4ForCausalLM"),
        "intermediate_size": expert_dim,
        "intermediate_size_mlp": a.intermediate_dim,
        "hidden_act": a.activation,
        "attention_bias": a.attn_bias,
        "rope_theta": a.rope_base,
        "rope_scaling": dict(a.rope_scaling) if a.rope_scaling else None,  # a copy: readers edit theirs
        "use_qk_norm": a.qk_norm,
        "no_rope_layers": [int(a.has_rope(i)) for i in range(a.num_layers)],
        "layer_types": [a.layer_type(i) for i in range(a.num_layers)],
        "attention_chunk_size": a.attn_chunk_size,
        "attn_temperature_tuning": a.attn_temperature is not None,
        "floor_scale": a.attn_temperature[0] if a.attn_temperature else 8192,
        "attn_scale": a.attn_temperature[1] if a.attn_temperature else 0.1,
        "num_local_experts": a.num_experts or 1,
        "num_experts_per_tok": a.experts_per_token or 1,
        "moe_layers": moe,
    }


def _llama4(**fields: Any) -> ModelArgs:
    """A published Llama 4 text model: 48 layers of 40 query / 8 kv heads of 128, 5120 wide;
    every fourth layer global NoPE with temperature tuning, the others chunked (8192)."""
    num_layers = 48
    nope = tuple(range(3, num_layers, 4))
    base = dict(
        family="llama4", vocab_size=202048, dim=5120, num_layers=num_layers, num_heads=40,
        num_kv_heads=8, head_dim=128, intermediate_dim=16384, norm_eps=1e-5, rope_base=500000.0,
        rope_interleaved=True, qk_norm_weight=False, nope_layers=nope,
        layer_types=tuple(FULL if i in nope else CHUNKED for i in range(num_layers)), attn_chunk_size=8192,
        attn_temperature=(8192, 0.1), experts_per_token=1, expert_dim=8192, shared_expert_dim=8192,
        norm_topk_prob=False, router_scoring="sigmoid", router_weights_inputs=True,
    )
    return ModelArgs(**{**base, **fields})


# The text_config of meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E (and their
# -Instruct releases) as published.
SIZES: dict[str, ModelArgs] = {
    "llama4_scout_17b_16e": _llama4(
        num_experts=16, qk_norm=True, max_seq_len=10485760,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    "llama4_maverick_17b_128e": _llama4(
        num_experts=128, qk_norm=False, max_seq_len=1048576, dense_layers=tuple(range(0, 48, 2))),
}

FAMILY = Family(
    name="llama4",
    model_types=("llama4_text", "llama4"),
    architecture="Llama4ForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    multimodal_types=MULTIMODAL,
    # Four layers as Maverick interleaves them (dense, MoE, dense, MoE+NoPE), 4 experts with a
    # shared one, q/k norms and Scout's RoPE scaling; chunks of 16 and a temperature floor of 4
    # so that both act within the test sequences.
    tiny=_llama4(vocab_size=288, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 intermediate_dim=256, expert_dim=64, shared_expert_dim=64, num_experts=4, qk_norm=True,
                 max_seq_len=2048, nope_layers=(3,), layer_types=(CHUNKED, CHUNKED, CHUNKED, FULL),
                 attn_chunk_size=16, attn_temperature=(4, 0.1), dense_layers=(0, 2),
                 rope_scaling=SIZES["llama4_scout_17b_16e"].rope_scaling),
)
