"""A linear layer with a low-rank adapter: LoRA, rank-stabilised LoRA and DoRA in one module.

    LoRA    y = W x + s * B A x,          s = alpha / r        (Hu et al. 2021)
    RSLoRA  the same with s = alpha / sqrt(r)                  (Kalajievo 2023)
    DoRA    y = m / ||W + s B A||_row * (W + s B A) x          (Liu et al. 2024)

`weight`/`bias` keep the names of the `nn.Linear` they replace, so a checkpoint loads into an
adapted model unchanged; the adapter lives in `lora_a`, `lora_b` (and `magnitude` for DoRA). For
QLoRA the frozen `weight` is a torchao NF4 tensor and the base matmul dequantizes on the fly.
As in PEFT, DoRA's row norm is treated as a constant in backward (paper, section 4.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.modules.peft.nf4 import is_nf4, nf4_module


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the frozen base weight: same Parameter, no copy
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        device = base.weight.device
        dtype = base.weight.dtype  # an NF4 tensor reports the dtype it was quantized from
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if use_dora else None
        self.disabled = False  # True: the layer is its base (`adapters_disabled` in apply.py)
        if device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like nn.Linear's default (and PEFT's), B = 0: the adapted model starts as the base;
        DoRA's magnitude starts at the base weight's row norms."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        if self.magnitude is not None:
            with torch.no_grad():
                self.magnitude.copy_(self.base_weight().norm(dim=1).to(self.magnitude.dtype))

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense tensor (dequantized for QLoRA)."""
        w = self.weight
        return w.get_original_weight() if is_nf4(w) else w

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b.weight @ self.lora_a.weight)  # [out, in]

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if is_nf4(self.weight):
            return nf4_module().linear_nf4(x, self.weight)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base(x)
        if self.disabled:
            return base + self.bias if self.bias is not None else base
        x_lora = self.dropout(x)
        h = self.lora_a(x_lora.to(self.lora_a.weight.dtype))
        if self.magnitude is None and h.dtype == base.dtype:
            # base + scale * h @ B^T in one fused GEMM (no separate scale and add passes)
            out = torch.addmm(base.flatten(0, -2), h.flatten(0, -2), self.lora_b.weight.t(),
                              alpha=self.scale).view_as(base)
            return out + self.bias if self.bias is not None else out
        lora = self.lora_b(h).to(base.dtype) * self.scale
        if self.magnitude is None:
            out = base + lora
        else:
            # Norm of the adapted weight per output row, detached as in the paper and PEFT.
            w = self.base_weight() + self.delta_weight().to(self.base_weight().dtype)
            norm_scale = (self.magnitude / w.norm(dim=1).detach()).to(base.dtype)
            if isinstance(self.dropout, nn.Identity):
                out = norm_scale * (base + lora)
            else:  # base path sees undropped x; DoRA's rescaling applies to the dropped path
                out = base + (norm_scale - 1) * self._base(x_lora) + norm_scale * lora
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight that equals this adapted layer (for merging and export)."""
        base = self.base_weight().float()
        w = base + self.delta_weight().float()
        if self.magnitude is not None:
            w = self.magnitude.float()[:, None] * w / w.norm(dim=1, keepdim=True)
        return w

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"
        return f"{self.in_features}, {self.out_features}, {kind} rank={self.rank}, alpha={self.alpha}"
