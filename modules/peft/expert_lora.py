"""LoRA on the stacked experts of a mixture-of-experts layer.

Each adapted projection `p` of expert `e` (gate_proj, up_proj, down_proj) becomes

    per_expert   y = W_e x + s * B_e A_e x      A [E, r, in], B [E, out, r]
    shared       y = W_e x + s * B A x          A [r, in],    B [out, r]   (one adapter for all)

with `s` the LoRA or RSLoRA scale. The per-expert path runs as two grouped matmuls over the
tokens already sorted by expert (no loop over tokens); the shared one is two plain matmuls.
`LoRAExperts` is an `Experts` that keeps the base's stacked parameters under their own names
(a checkpoint loads unchanged) and overrides `Experts.project`, the hook meant for adapters.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.modules.moe import Experts, grouped_linear

EXPERT_MODES = ("per_expert", "shared")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertAdapter(nn.Module):
    """The low-rank update of one stacked projection [E, out, in]."""

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, *, rank: int, shared: bool,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        lead = () if shared else (num_experts,)
        self.shared = shared
        self.lora_a = nn.Parameter(torch.empty(*lead, rank, in_dim, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(*lead, out_dim, rank, device=device, dtype=dtype))
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """A uniform in +-1/sqrt(in) per expert, as nn.Linear's (and PEFT's) default; B = 0."""
        bound = 1.0 / math.sqrt(self.lora_a.shape[-1])
        nn.init.uniform_(self.lora_a, -bound, bound)
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T, in] sorted by expert -> B A x [T, out] (unscaled)."""
        x = x.to(self.lora_a.dtype)
        if self.shared:
            return F.linear(F.linear(x, self.lora_a), self.lora_b)
        return grouped_linear(grouped_linear(x, self.lora_a, counts), self.lora_b, counts)

    def delta(self) -> torch.Tensor:
        """B A as [E, out, in] (or [out, in] when shared), for merging."""
        return self.lora_b @ self.lora_a


class LoRAExperts(Experts):
    def __init__(
        self,
        base: Experts,
        *,
        projections: Sequence[str],
        rank: int,
        alpha: float,
        mode: str = "per_expert",
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        # Not Experts.__init__: it would allocate a second copy of every expert weight.
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if mode not in EXPERT_MODES:
            raise ValueError(f"lora experts mode '{mode}' does not exist; choose from {', '.join(EXPERT_MODES)}")
        unknown = [p for p in projections if p not in PROJECTIONS]
        if unknown or not projections:
            raise ValueError(f"expert projections {list(projections)}: choose from {', '.join(PROJECTIONS)}")
        self.num_experts, self.activation = base.num_experts, base.activation
        for name in PROJECTIONS:  # the same frozen Parameters, no copy
            setattr(self, name, getattr(base, name))
            getattr(self, name).requires_grad_(False)
        self.rank, self.alpha, self.mode, self.use_rslora = rank, alpha, mode, use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: the experts are their base (`adapters_disabled` in apply.py)
        w = base.gate_proj
        self.lora = nn.ModuleDict({
            name: ExpertAdapter(self.num_experts, getattr(base, name).shape[2], getattr(base, name).shape[1],
                                rank=rank, shared=mode == "shared", device=w.device, dtype=w.dtype)
            for name in projections
        })

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = grouped_linear(x, getattr(self, name), counts)
        if name not in self.lora or self.disabled:
            return out
        return out + self.scale * self.lora[name](self.dropout(x), counts).to(out.dtype)

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(std, generator)
        for adapter in self.lora.values():
            adapter.reset_parameters()

    @torch.no_grad()
    def merged(self, dtype: torch.dtype | None = None) -> Experts:
        """A plain `Experts` whose stacked weights equal this adapted one (W + s B A per expert)."""
        with torch.device("meta"):
            out = Experts(self.num_experts, self.gate_proj.shape[2], self.gate_proj.shape[1],
                          activation=self.activation)
        for name in PROJECTIONS:
            w = getattr(self, name)
            if name in self.lora:
                w = w.float() + self.scale * self.lora[name].delta().float()
            setattr(out, name, nn.Parameter(w.to(dtype or self.lora_dtype()), requires_grad=False))
        return out

    def lora_dtype(self) -> torch.dtype:
        return next(iter(self.lora.values())).lora_a.dtype

    def extra_repr(self) -> str:
        kind = "rslora" if self.use_rslora else "lora"
        return f"{', '.join(self.lora)}: {self.mode} {kind} rank={self.rank}, alpha={self.alpha}"
