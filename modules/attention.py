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
                self._attend(qs, ks, vs, None, 0)
                for qs, ks, vs in zip(q.split(seq_lens, 2), k.split(seq_lens, 2), v.split(seq_lens, 2))
            ], dim=2)
        else:
            out = self._attend(q, k, v, mask, cache_pos or 0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        q_start: int,
    ) -> torch.Tensor:
        """Attention of q [b, h, s, d] (at positions q_start..) over k/v [b, h, kv_len, d] from 0.

        mask None means causal; a sliding window narrows it to the last `sliding_window` keys.
        Plain SDPA (and its fused kernels) whenever no option needs an explicit mask.
        """
        s, kv_len = q.shape[2], k.shape[2]
        if self.sliding_window is not None and kv_len > self.sliding_window:
            window = causal_window_mask(q_start, s, kv_len, self.sliding_window, q.device)
            mask = window if mask is None else mask & window
        if self.softcap is None:
            causal = bool(mask is None and s > 1)  # a plain bool: a symbolic one splits compiled graphs
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        # Soft-capping sits between the scores and the softmax, which SDPA cannot express.
        if mask is None and s > 1:
            mask = causal_window_mask(q_start, s, kv_len, None, q.device)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = (q @ k.transpose(-2, -1)) * scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def causal_window_mask(
    q_start: int, s: int, kv_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """bool [s, kv_len]: query q_start+i sees key j when j <= q_start+i (and, with a window,
    q_start+i - j < window, HF's convention: the window counts the query itself)."""
    q = torch.arange(q_start, q_start + s, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask
