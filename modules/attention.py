"""Multi-head attention with grouped-query heads: projections, q/k norms, RoPE and the KV
cache here; the attention itself is `modules/attend.py`'s one entry point.

Variants pass parts instead of flags: q/k norms (Qwen3), biases (in the projections they pass),
a logit soft-cap or sliding window (Gemma-2, Mistral), chunked local attention, layers without
RoPE and a position-dependent query temperature (Llama 4) are arguments, not subclasses.
"""

from __future__ import annotations

from typing import Callable

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
        chunk_size: int | None = None,
        rope: bool = True,
        rope_interleaved: bool = False,
        temperature: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        self.chunk_size = chunk_size  # keys only in the query's own chunk of positions (Llama 4)
        self.rope = rope  # False: no position embedding at all (NoPE)
        self.rope_interleaved = rope_interleaved
        self.temperature = temperature  # positions [b, s] -> query multipliers [b, s]
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
        if self.rope:
            q = apply_rope(q, cos, sin, interleaved=self.rope_interleaved)
            k = apply_rope(k, cos, sin, interleaved=self.rope_interleaved)
        if self.temperature is not None:
            q = (q * self.temperature(layout.positions)[:, None, :, None]).to(q.dtype)
        if layout.kind == "cached":
            if self.kv_cache is None:
                raise ValueError("a cached layout needs KV caches: call model.setup_caches(...) first")
            k, v = self.kv_cache.update(layout.cache_pos, k, v)
        elif layout.cache_index is not None:  # a packed prefill: fill the caches, attend as varlen
            if self.kv_cache is None:
                raise ValueError("a prefill into KV caches needs them: call model.setup_caches(...) first")
            self.kv_cache.scatter(*layout.cache_index, k, v)
        out = attend(q, k, v, layout, scale=self.scale, window=self.sliding_window, softcap=self.softcap,
                     chunk=self.chunk_size)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class LogTemperature:
    """Llama 4's attention-temperature tuning of its NoPE layers (arXiv 2501.19399): the query at
    position p is multiplied by 1 + scale * log(1 + floor((p + 1) / floor_scale)), so that
    attention stays sharp over contexts far longer than `floor_scale`."""

    def __init__(self, *, floor_scale: float, scale: float) -> None:
        self.floor_scale, self.scale = floor_scale, scale

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.scale + 1.0

    def __repr__(self) -> str:
        return f"LogTemperature(floor_scale={self.floor_scale}, scale={self.scale})"
