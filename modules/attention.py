"""Multi-head attention with grouped-query heads, through `scaled_dot_product_attention`.

Variants pass parts instead of flags: q/k norms (Qwen3), biases (in the projections they pass),
a logit soft-cap or sliding window (Gemma-2, Mistral) are arguments, not subclasses.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.modules.kv_cache import KVCache
from tunewright.modules.rope import apply_rope


class Attention(nn.Module):
    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.scale = scale
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache_pos: int | None = None,
        seq_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x [b, s, dim]; mask None means causal, else bool [b, 1, s, kv_len] (True = attend);
        cache_pos is where this chunk starts in the KV cache (generation only); seq_lens: x is
        [1, sum(seq_lens)], independent sequences laid end to end (padding-free batches), each
        attended causally on its own, so no FLOP is spent across sequences or on padding."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)
        if self.num_kv_heads != self.num_heads:
            # Expanding k/v beat SDPA's enable_gqa on CPU: 91 vs 103 ms fwd+bwd for SmolLM2's
            # 9/3 heads at 1,200 tokens (torch 2.13, 2 threads).
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if seq_lens is not None and len(seq_lens) > 1:
            out = torch.cat([
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale)
                for qs, ks, vs in zip(q.split(seq_lens, 2), k.split(seq_lens, 2), v.split(seq_lens, 2))
            ], dim=2)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and s > 1, scale=self.scale
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
