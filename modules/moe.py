"""Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE, Llama 4): a router picks top-k experts
per token. Routers differ in three ways, all arguments: softmax over all experts (Mixtral) or a
sigmoid per expert (Llama 4), router weights on the experts' outputs or on their inputs (Llama 4
scales a token before its expert sees it), and an always-on shared expert beside them (Llama 4).

The experts are stacked weights (`gate_proj`/`up_proj` [E, hidden, dim], `down_proj` [E, dim,
hidden]) and run as grouped matrix multiplies over the tokens sorted by expert: one call per
projection for all experts, no Python loop over experts or tokens (`torch._grouped_mm`, with a
per-expert loop only where that kernel is missing or cannot take the sizes: it needs 16-byte
aligned rows, fp32/bf16/fp16 on CPU, bf16 on CUDA). Checkpoints store one tensor per expert;
the family's weight map stacks and unstacks them.

On a GPU, run MoE models with `dtype: bf16`: fp32 compute there takes the per-expert loop, whose
split sizes are read back to the host once per projection and layer (a sync each). Mixed
precision (fp32 master weights, training/precision.py) computes in bf16 and takes the kernel:
under autocast both operands go to the autocast dtype here, as autocast does for a matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # The grouped-mm backward rejects expanded (stride-0) gradients, e.g. from `.sum()`.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False  # the CUDA kernel is bf16 only
    if x.device.type not in ("cpu", "cuda") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # The kernel needs 16-byte-aligned strides: both feature sizes (rows are padded below).
    return all(n * x.element_size() % 16 == 0 for n in weight.shape[1:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [T, in] sorted by group, weight [E, out, in], counts [E] rows per group -> [T, out]."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know the grouped kernel
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.shape[0] > 0 and _grouped_mm_ok(x, weight):
        # The weight gradient reads x transposed, so the row count must be aligned too: zero
        # rows appended to the last group change neither its output rows nor its gradient.
        num_rows = x.shape[0]
        pad = -num_rows % 16
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        offs = counts.cumsum(0).to(torch.int32)
        offs[-1] += pad
        y = torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=offs)
        return _contiguous_grad(y[:num_rows] if pad else y)
    chunks = x.split(counts.tolist())
    return torch.cat([c @ weight[e].t() for e, c in enumerate(chunks)])


class Experts(nn.Module):
    """E gated MLPs (`down(act(gate(x)) * up(x))`) as stacked parameters."""

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, *,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.activation = activation

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One stacked projection; adapters (LoRA on experts) override this."""
        return grouped_linear(x, getattr(self, name), counts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T, dim] sorted by expert, counts [E] -> [T, dim]."""
        h = self.activation(self.project("gate_proj", x, counts)) * self.project("up_proj", x, counts)
        return self.project("down_proj", h, counts)

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for p in (self.gate_proj, self.up_proj, self.down_proj):
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=generator))


SCORINGS = ("softmax", "sigmoid")


class MoE(nn.Module):
    def __init__(
        self, *, router: nn.Linear, experts: Experts, top_k: int, norm_topk_prob: bool = True,
        scoring: str = "softmax", weight_inputs: bool = False, shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"router scoring '{scoring}' does not exist; choose from {', '.join(SCORINGS)}")
        self.router = router  # dim -> num_experts logits; frozen by LoRA like every base weight
        self.experts = experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.scoring = scoring
        self.weight_inputs = weight_inputs
        self.shared_expert = shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Routing in fp32 as the references do: the top-k choice must not flip under bf16.
        logits = self.router(x).float()
        if self.scoring == "softmax":
            weights, chosen = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # [T, k]
        else:  # chosen by logit: fp32 sigmoids of logits above ~17 are all 1.0, and would tie
            weights, chosen = logits.topk(self.top_k, dim=-1)
            weights = torch.sigmoid(weights)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.experts.num_experts)
        w = weights.reshape(-1)[order, None].to(x.dtype)
        if self.weight_inputs:
            y = self.experts(x[token] * w, counts)
        else:
            y = self.experts(x[token], counts) * w
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared_expert is not None:
            out = self.shared_expert(x) + out
        return out.view(shape)
