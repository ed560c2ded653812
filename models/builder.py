"""Build the generic decoder from `ModelArgs`. Families that differ override parts, not this."""

from __future__ import annotations

import torch
from torch import nn

from tunewright.models.args import ModelArgs
from tunewright.modules.attention import Attention
from tunewright.modules.decoder import Decoder, DecoderLayer
from tunewright.modules.mlp import GatedMLP
from tunewright.modules.norms import RMSNorm
from tunewright.modules.rope import RotaryEmbedding


def build_layer(args: ModelArgs) -> DecoderLayer:
    hd = args.resolved_head_dim
    attn = Attention(
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=hd,
        q_proj=nn.Linear(args.dim, args.num_heads * hd, bias=args.attn_bias),
        k_proj=nn.Linear(args.dim, args.num_kv_heads * hd, bias=args.attn_bias),
        v_proj=nn.Linear(args.dim, args.num_kv_heads * hd, bias=args.attn_bias),
        o_proj=nn.Linear(args.num_heads * hd, args.dim, bias=args.attn_bias),
    )
    mlp = GatedMLP(
        gate_proj=nn.Linear(args.dim, args.intermediate_dim, bias=args.mlp_bias),
        up_proj=nn.Linear(args.dim, args.intermediate_dim, bias=args.mlp_bias),
        down_proj=nn.Linear(args.intermediate_dim, args.dim, bias=args.mlp_bias),
    )
    return DecoderLayer(
        attn=attn,
        mlp=mlp,
        attn_norm=RMSNorm(args.dim, eps=args.norm_eps),
        mlp_norm=RMSNorm(args.dim, eps=args.norm_eps),
    )


def build_decoder(args: ModelArgs) -> Decoder:
    """Build on the current default device; wrap in `torch.device("meta")` to cost no memory."""
    return Decoder(
        tok_embeddings=nn.Embedding(args.vocab_size, args.dim),
        layers=[build_layer(args) for _ in range(args.num_layers)],
        norm=RMSNorm(args.dim, eps=args.norm_eps),
        output=None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False),
        rope=RotaryEmbedding(args.resolved_head_dim, base=args.rope_base, scaling=args.rope_scaling),
    )


def init_weights(model: Decoder, *, std: float = 0.02, seed: int | None = None) -> None:
    """Random init like HF's `_init_weights` (normal(0, std) linears/embeddings, ones for norms)."""
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
