"""RMSNorm, computed in fp32 like the reference implementations so bf16 runs match them."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`. `offset=1.0` gives Gemma's `(1 + weight)` form, whose checkpoints
    store the weight minus one."""

    def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma scales in fp32 and casts after, `(h * (1 + w)).to(dtype)`, where Llama casts
            # first: the two differ in bf16, and each checkpoint was trained with its own.
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight) if not self.offset else nn.init.zeros_(self.weight)


class UnitRMSNorm(nn.Module):
    """`x / rms(x)` with no learned weight: Llama 4's q/k norm (transformers' `Llama4TextL2Norm`)."""

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
