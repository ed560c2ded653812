"""Mixtral: Mistral's attention with a mixture of experts in every block (`modules/moe.py`).

The router always renormalises its top-k weights. Checkpoints store each expert apart
(`block_sparse_moe.experts.{e}.w1/w3/w2` = gate/up/down); we stack them into one tensor per
projection, and unstack on save, which is also the format transformers writes by default.
"""

from __future__ import annotations

from typing import Any

from tunewright.models import llama, mistral
from tunewright.models.args import ModelArgs
from tunewright.models.family import Family
from tunewright.models.weight_map import WeightMap

_MOE = "model.layers.{}.block_sparse_moe"

SIZES: dict[str, ModelArgs] = {
    # mistralai/Mixtral-8x7B-v0.1 (and -Instruct-v0.1)
    "mixtral_8x7b": ModelArgs(family="mixtral", vocab_size=32000, dim=4096, num_layers=32,
                              num_heads=32, num_kv_heads=8, intermediate_dim=14336,
                              rope_base=1000000.0, max_seq_len=32768, norm_eps=1e-5,
                              num_experts=8, experts_per_token=2),
}

WEIGHTS = WeightMap(
    [*(p for p in llama.WEIGHTS.pairs if ".mlp." not in p[0]),
     (f"{_MOE}.gate.weight", "layers.{}.mlp.router.weight")],
    experts=[
        (f"{_MOE}.experts.{{}}.w1.weight", "layers.{}.mlp.experts.gate_proj"),
        (f"{_MOE}.experts.{{}}.w3.weight", "layers.{}.mlp.experts.up_proj"),
        (f"{_MOE}.experts.{{}}.w2.weight", "layers.{}.mlp.experts.down_proj"),
    ],
)


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    # transformers 5 writes `num_local_experts`; its attribute map also accepts `num_experts`.
    return mistral.args_from_hf(c).replace(
        family="mixtral",
        num_experts=c.get("num_local_experts") or c.get("num_experts") or 8,
        experts_per_token=c.get("num_experts_per_tok", 2),
    )


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if a.dense_layers or not a.norm_topk_prob or a.expert_dim not in (None, a.intermediate_dim):
        raise ValueError("mixtral checkpoints have experts in every layer, renormalised top-k "
                         "weights and experts of intermediate_size; this model differs")
    return {**mistral.hf_config(a), "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral", "num_local_experts": a.num_experts,
            "num_experts_per_tok": a.experts_per_token, "router_jitter_noise": 0.0}


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    architecture="MixtralForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # 4 experts, top-2, GQA: every token mixes two experts, and some expert sees few tokens.
    tiny=ModelArgs(family="mixtral", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_dim=256, max_seq_len=2048, norm_eps=1e-5,
                   rope_base=1000000.0, num_experts=4, experts_per_token=2),
)
