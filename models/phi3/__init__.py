"""Phi-3, Phi-3.5 and Phi-4 (HF `phi3`, Phi3ForCausalLM; Phi-4 14B and Phi-4-mini share it).

The generic decoder with Phi-3's options as data: LongRoPE frequency scaling, partial rotary
(Phi-4-mini rotates 3/4 of each head), a sliding window (Phi-3-mini-4k's 2,047, which
transformers applies), tied or untied head. Checkpoints fuse q/k/v into `qkv_proj` and gate/up
into `gate_up_proj`; we keep separate layers (so LoRA targets and the decoder are the same for
every family) and the weight map splits and re-concatenates them.
"""

from __future__ import annotations

from typing import Any

from tunewright.models.args import ModelArgs
from tunewright.models.family import Family, rope_scaling, rope_theta, shape_from_hf, shape_to_hf
from tunewright.models.weight_map import WeightMap

# LongRoPE factors (one per rotary frequency) from the published config.json files.
_PHI3_5_MINI_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
]
_PHI3_5_MINI_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    *[2.0199997425079346] * 6, *[2.0299997329711914] * 9, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533,
]
_PHI4_MINI_LONG = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023,
    4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372,
    10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807,
    22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64,
    32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]


def longrope(short: list[float], long: list[float], *, original: int, max_seq_len: int) -> dict[str, Any]:
    # `factor` spelled out: transformers derives it from the two context lengths when absent,
    # and our RotaryEmbedding only sees this dict.
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original, "factor": max_seq_len / original}


_MINI = ModelArgs(family="phi3", vocab_size=32064, dim=3072, num_layers=32, num_heads=32,
                  num_kv_heads=32, intermediate_dim=8192, max_seq_len=4096, norm_eps=1e-5)

SIZES: dict[str, ModelArgs] = {
    # microsoft/Phi-3-mini-4k-instruct (3.8B)
    "phi3_mini": _MINI.replace(sliding_window=2047),
    # microsoft/Phi-3.5-mini-instruct (3.8B, 128k context by LongRoPE)
    "phi3_5_mini": _MINI.replace(
        max_seq_len=131072, sliding_window=262144,
        rope_scaling=longrope(_PHI3_5_MINI_SHORT, _PHI3_5_MINI_LONG, original=4096, max_seq_len=131072)),
    # microsoft/phi-4 (14B)
    "phi4": ModelArgs(family="phi3", vocab_size=100352, dim=5120, num_layers=40, num_heads=40,
                      num_kv_heads=10, intermediate_dim=17920, rope_base=250000.0,
                      max_seq_len=16384, norm_eps=1e-5),
    # microsoft/Phi-4-mini-instruct (3.8B): GQA, 3/4 partial rotary, LongRoPE, tied head
    "phi4_mini": _MINI.replace(
        vocab_size=200064, num_heads=24, num_kv_heads=8, rotary_dim=96, max_seq_len=131072,
        sliding_window=262144, tie_embeddings=True,
        rope_scaling=longrope([1.0] * 48, _PHI4_MINI_LONG, original=4096, max_seq_len=131072)),
}

WEIGHTS = WeightMap(
    [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.weight"),
        ("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.down_proj.weight"),
        ("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
        ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
    fused=[
        ("model.layers.{}.self_attn.qkv_proj.weight",
         ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight", "layers.{}.attn.v_proj.weight")),
        ("model.layers.{}.mlp.gate_up_proj.weight",
         ("layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.up_proj.weight")),
    ],
)


def _partial_rotary_factor(c: dict[str, Any]) -> float:
    nested = (c.get("rope_parameters") or {}).get("partial_rotary_factor")  # transformers 5 saves it here
    return float(c.get("partial_rotary_factor") or nested or 1.0)


def _longrope_from_hf(c: dict[str, Any]) -> dict[str, Any] | None:
    scaling = rope_scaling(c)
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("longrope", "su", "yarn"):  # Phi3Config reads the old "su"/"yarn" as longrope
        raise ValueError(f"config.json: phi3 rope_scaling type '{kind}' is not supported (only longrope)")
    out = {k: v for k, v in scaling.items() if k not in ("type", "partial_rotary_factor")}
    out["rope_type"] = "longrope"
    # Phi3Config's top-level value (default 4096) wins over the one inside rope_scaling.
    out["original_max_position_embeddings"] = c.get("original_max_position_embeddings", 4096)
    if out.get("factor") is None and out.get("attention_factor") is None:
        out["factor"] = c["max_position_embeddings"] / out["original_max_position_embeddings"]
    return out


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    factor = _partial_rotary_factor(c)
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError("config.json: phi3 checkpoints have no biases; this one sets attention_bias/mlp_bias")
    return ModelArgs(
        **shape_from_hf(c, "phi3", norm_eps=1e-5),
        rope_base=rope_theta(c),
        rope_scaling=_longrope_from_hf(c),
        rotary_dim=int(head_dim * factor) if factor != 1.0 else None,
        sliding_window=c.get("sliding_window") or None,
    )


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if a.attn_bias or a.mlp_bias or a.qk_norm or a.layer_types is not None or a.activation != "silu":
        raise ValueError("phi3 checkpoints have no biases, no q/k norm, one window for all layers "
                         "and SiLU; this model differs")
    scaling = a.rope_scaling
    hd = a.resolved_head_dim
    return {
        **shape_to_hf(a, "phi3", "Phi3ForCausalLM"),
        "hidden_act": "silu",
        "rope_theta": a.rope_base,
        "rope_scaling": scaling,
        "partial_rotary_factor": (a.rotary_dim or hd) / hd,
        # transformers takes this over rope_scaling's own (and defaults it to 4096)
        "original_max_position_embeddings": (scaling or {}).get("original_max_position_embeddings",
                                                                 a.max_seq_len),
        "sliding_window": a.sliding_window,
        # Phi3Config's defaults (pad 32000) index past a small vocabulary; ids live with the tokenizer.
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }


_TINY_ROTARY = 24  # 3/4 of head_dim 32, like Phi-4-mini

FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    architecture="Phi3ForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # Every Phi-3 option: GQA, partial rotary, LongRoPE with an original context of 32 (test
    # sequences cross it, so the long factors run), a window shorter than test sequences, tied head.
    tiny=ModelArgs(
        family="phi3", vocab_size=288, dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_dim=256, max_seq_len=512, norm_eps=1e-5, rotary_dim=_TINY_ROTARY,
        sliding_window=48, tie_embeddings=True,
        rope_scaling=longrope([1.0 + i / 8 for i in range(_TINY_ROTARY // 2)],
                              [1.0 + 3 * i for i in range(_TINY_ROTARY // 2)], original=32, max_seq_len=512)),
)
