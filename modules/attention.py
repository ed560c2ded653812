"""Multi-head attention with grouped-query heads: projections, q/k norms, RoPE and the KV
cache here; the attention itself is `modules/attend.py`'s one entry point.

Variants pass parts instead of flags: q/k norms (Qwen3), biases (in the projections they pass),
a logit soft-cap or sliding window (Gemma-2, Mistral) are arguments, not subclasses.
"""

from __future__ import annotations

import torch
from torch import nn

from tunewright.modules.attend import Layout, attend
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
        sliding_window: int | None = None,
        softcap: float | None = None,
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
        self.sliding_window = sliding_window  # None: full causal
        self.softcap = softcap
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: Layout) -> torch.Tensor:
        """x [b, s, dim] laid out as `layout` says (`modules/attend.py`); with a `cached`
        layout, k/v are written into the KV cache at `layout.cache_pos` and the queries attend
        to everything cached so far."""
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
        if layout.kind == "cached":
            if self.kv_cache is None:
                raise ValueError("a cached layout needs KV caches: call model.setup_caches(...) first")
            k, v = self.kv_cache.update(layout.cache_pos, k, v)
        out = attend(q, k, v, layout, scale=self.scale, window=self.sliding_window, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
