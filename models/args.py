"""`ModelArgs`: the shape and options of a decoder. A model size is one of these, a row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    head_dim: int | None = None  # None: dim // num_heads
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        hd = self.resolved_head_dim
        attn = self.dim * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attn_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads) + self.dim
        mlp = 3 * self.dim * self.intermediate_dim
        if self.mlp_bias:
            mlp += 2 * self.intermediate_dim + self.dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.num_layers * per_layer + self.dim + head
