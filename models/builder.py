"""Build the generic decoder from `ModelArgs`: every family option picks a part here.

A family whose model is the generic decoder with some options set (Qwen's biases, Gemma's
norms, Mistral's window, Mixtral's experts) needs no builder of its own; only a module that
exists nowhere else would.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.models.args import ModelArgs
from tunewright.modules.attention import Attention, LogTemperature
from tunewright.modules.decoder import Decoder, DecoderLayer
from tunewright.modules.mlp import GatedMLP
from tunewright.modules.moe import MoE, Experts
from tunewright.modules.norms import RMSNorm, UnitRMSNorm
from tunewright.modules.rope import RotaryEmbedding

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}' (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _norm(args: ModelArgs, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=args.norm_eps, offset=args.norm_offset)


def _gated_mlp(args: ModelArgs, hidden_dim: int) -> GatedMLP:
    return GatedMLP(
        gate_proj=nn.Linear(args.dim, hidden_dim, bias=args.mlp_bias),
        up_proj=nn.Linear(args.dim, hidden_dim, bias=args.mlp_bias),
        down_proj=nn.Linear(hidden_dim, args.dim, bias=args.mlp_bias),
        activation=activation(args.activation),
    )


def build_mlp(args: ModelArgs, layer: int) -> nn.Module:
    if args.is_moe_layer(layer):
        return MoE(
            router=nn.Linear(args.dim, args.num_experts, bias=False),
            experts=Experts(args.num_experts, args.dim, args.expert_dim or args.intermediate_dim,
                            activation=activation(args.activation)),
            top_k=args.experts_per_token,
            norm_topk_prob=args.norm_topk_prob,
            scoring=args.router_scoring,
            weight_inputs=args.router_weights_inputs,
            shared_expert=_gated_mlp(args, args.shared_expert_dim) if args.shared_expert_dim else None,
        )
    return _gated_mlp(args, args.intermediate_dim)


def _qk_norm(args: ModelArgs, layer: int) -> nn.Module | None:
    if not args.qk_norm or not args.has_rope(layer):
        return None
    return _norm(args, args.resolved_head_dim) if args.qk_norm_weight else UnitRMSNorm(eps=args.norm_eps)


def _temperature(args: ModelArgs, layer: int) -> LogTemperature | None:
    if args.attn_temperature is None or args.has_rope(layer):
        return None
    floor_scale, scale = args.attn_temperature
    return LogTemperature(floor_scale=floor_scale, scale=scale)


def build_layer(args: ModelArgs, layer: int = 0) -> DecoderLayer:
    hd = args.resolved_head_dim
    attn = Attention(
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=hd,
        q_proj=nn.Linear(args.dim, args.num_heads * hd, bias=args.attn_bias),
        k_proj=nn.Linear(args.dim, args.num_kv_heads * hd, bias=args.attn_bias),
        v_proj=nn.Linear(args.dim, args.num_kv_heads * hd, bias=args.attn_bias),
        o_proj=nn.Linear(args.num_heads * hd, args.dim, bias=args.resolved_out_bias),
        q_norm=_qk_norm(args, layer),
        k_norm=_qk_norm(args, layer),
        scale=args.attn_scale,
        sliding_window=args.window(layer),
        softcap=args.attn_softcap,
        chunk_size=args.chunk(layer),
        rope=args.has_rope(layer),
        rope_interleaved=args.rope_interleaved,
        temperature=_temperature(args, layer),
    )
    return DecoderLayer(
        attn=attn,
        mlp=build_mlp(args, layer),
        attn_norm=_norm(args, args.dim),
        mlp_norm=_norm(args, args.dim),
        post_attn_norm=_norm(args, args.dim) if args.sandwich_norms else None,
        post_mlp_norm=_norm(args, args.dim) if args.sandwich_norms else None,
    )


def build_decoder(args: ModelArgs) -> Decoder:
    """Build on the current default device; wrap in `torch.device("meta")` to cost no memory."""
    hd = args.resolved_head_dim
    local_rope = None
    if args.local_rope_base is not None:
        local_rope = RotaryEmbedding(hd, base=args.local_rope_base, rotary_dim=args.rotary_dim)
    return Decoder(
        tok_embeddings=nn.Embedding(args.vocab_size, args.dim),
        layers=[build_layer(args, i) for i in range(args.num_layers)],
        norm=_norm(args, args.dim),
        output=None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False),
        rope=RotaryEmbedding(hd, base=args.rope_base, scaling=args.rope_scaling, rotary_dim=args.rotary_dim),
        local_rope=local_rope,
        embed_scale=args.embed_scale,
        final_logit_softcap=args.final_softcap,
    )


def init_weights(model: Decoder, *, std: float = 0.02, seed: int | None = None) -> None:
    """Random init like HF's `_init_weights` (normal(0, std) linears/embeddings/experts, norms
    to their identity)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
            with torch.no_grad():
                module.weight.copy_(w)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()
        elif isinstance(module, Experts):
            module.reset_parameters(std, gen)
