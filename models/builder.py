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
from tunewright.modules.attention import Attention
from tunewright.modules.decoder import Decoder, DecoderLayer
from tunewright.modules.mlp import GatedMLP
from tunewright.modules.moe import MoE, Experts
from tunewright.modules.norms import RMSNorm
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


def build_mlp(args: ModelArgs, layer: int) -> nn.Module:
    act = activation(args.activation)
    if args.is_moe_layer(layer):
        return MoE(
            router=nn.Linear(args.dim, args.num_experts, bias=False),
            experts=Experts(args.num_experts, args.dim, args.expert_dim or args.intermediate_dim,
                            activation=act),
            top_k=args.experts_per_token,
            norm_topk_prob=args.norm_topk_prob,
        )
    return GatedMLP(
        gate_proj=nn.Linear(args.dim, args.intermediate_dim, bias=args.mlp_bias),
        up_proj=nn.Linear(args.dim, args.intermediate_dim, bias=args.mlp_bias),
        down_proj=nn.Linear(args.intermediate_dim, args.dim, bias=args.mlp_bias),
        activation=act,
    )


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
        q_norm=_norm(args, hd) if args.qk_norm else None,
        k_norm=_norm(args, hd) if args.qk_norm else None,
        scale=args.attn_scale,
        sliding_window=args.window(layer),
        softcap=args.attn_softcap,
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
