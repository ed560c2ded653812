"""Qwen3-MoE: Qwen3's attention (q/k norms, head_dim apart from dim / num_heads) with a mixture
of small experts (`moe_intermediate_size`) in the blocks that `decoder_sparse_step` and
`mlp_only_layers` leave sparse; the other blocks keep a dense MLP of `intermediate_size`.
Whether the top-k weights are renormalised is `norm_topk_prob` (true in the released models).
"""

from __future__ import annotations

from typing import Any

from tunewright.models import llama
from tunewright.models.args import ModelArgs
from tunewright.models.family import Family
from tunewright.models.weight_map import WeightMap

_MLP = "model.layers.{}.mlp"

SIZES: dict[str, ModelArgs] = {
    # Qwen/Qwen3-30B-A3B (and -Base, -Instruct-2507): 128 experts, 8 per token, ~3.3B active.
    "qwen3_30b_a3b": ModelArgs(family="qwen3_moe", vocab_size=151936, dim=2048, num_layers=48,
                               num_heads=32, num_kv_heads=4, head_dim=128, intermediate_dim=6144,
                               norm_eps=1e-6, rope_base=1000000.0, max_seq_len=40960,
                               qk_norm=True, num_experts=128, experts_per_token=8,
                               expert_dim=768, norm_topk_prob=True),
}

WEIGHTS = WeightMap(
    [*llama.WEIGHTS.pairs,  # the dense blocks' MLP keeps Llama's names
     ("model.layers.{}.self_attn.q_norm.weight", "layers.{}.attn.q_norm.weight"),
     ("model.layers.{}.self_attn.k_norm.weight", "layers.{}.attn.k_norm.weight"),
     (f"{_MLP}.gate.weight", "layers.{}.mlp.router.weight")],
    experts=[
        (f"{_MLP}.experts.{{}}.gate_proj.weight", "layers.{}.mlp.experts.gate_proj"),
        (f"{_MLP}.experts.{{}}.up_proj.weight", "layers.{}.mlp.experts.up_proj"),
        (f"{_MLP}.experts.{{}}.down_proj.weight", "layers.{}.mlp.experts.down_proj"),
    ],
)


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    base = llama.args_from_hf(c)
    # Released configs say `num_experts`; transformers 5 saves it as `num_local_experts`.
    num_experts = c.get("num_experts") or c.get("num_local_experts") or 0
    step = c.get("decoder_sparse_step") or 1
    mlp_only = set(c.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(base.num_layers)
                  if i in mlp_only or num_experts == 0 or (i + 1) % step != 0)
    bias = bool(c.get("attention_bias", False))
    return base.replace(
        family="qwen3_moe",
        qk_norm=True,
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=False,
        sliding_window=c.get("sliding_window") if c.get("use_sliding_window") else None,
        num_experts=num_experts,
        experts_per_token=c.get("num_experts_per_tok", 8),
        expert_dim=c.get("moe_intermediate_size", 768),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        dense_layers=dense,
    )


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if not a.qk_norm or a.resolved_out_bias != a.attn_bias or a.mlp_bias or a.layer_types:
        raise ValueError("qwen3_moe checkpoints have q/k norms, one attention_bias switch for "
                         "q/k/v/o, no MLP bias and one window for all layers; this model differs")
    config = {k: v for k, v in llama.hf_config(a).items() if k != "mlp_bias"}
    return {
        **config,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": a.num_experts,
        "num_experts_per_tok": a.experts_per_token,
        "moe_intermediate_size": a.expert_dim or a.intermediate_dim,
        "norm_topk_prob": a.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(a.dense_layers),
        "use_sliding_window": a.sliding_window is not None,
        "sliding_window": a.sliding_window,
    }


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architecture="Qwen3MoeForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # q/k norms, wide heads, a dense first block (mlp_only_layers) and 4 experts top-2.
    tiny=ModelArgs(family="qwen3_moe", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=64, intermediate_dim=256, norm_eps=1e-6,
                   rope_base=1000000.0, max_seq_len=2048, qk_norm=True, num_experts=4,
                   experts_per_token=2, expert_dim=64, norm_topk_prob=True, dense_layers=(0,)),
)
