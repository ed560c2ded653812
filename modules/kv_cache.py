"""Key/value cache for generation: fixed-size buffers written at the decoded positions."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self, *, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        # Not persistent: a cache is never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_seq_len = max_seq_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` of the batch (an index tensor on the cache's device)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def scatter(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [1, kv_heads, T, d] of T packed tokens: token t to row rows[t], position
        positions[t] (a padding-free prefill of prompts of different lengths); the decoder checks
        the positions against the cache once per forward, not once per layer."""
        self.k[rows, :, positions] = k[0].transpose(0, 1).to(self.k.dtype)
        self.v[rows, :, positions] = v[0].transpose(0, 1).to(self.v.dtype)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [b, kv_heads, s, d] at positions start..start+s; return everything so far."""
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.max_seq_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
