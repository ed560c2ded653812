"""LoftQ: start QLoRA's adapters where they undo the quantization error (Li et al. 2023).

QLoRA quantizes W to NF4 and starts B = 0, so training begins at Q(W), not at W. LoftQ picks the
NF4 base Q and the adapters together so that Q + s * B A is close to W:

    Q_0 = nf4(W);   for t = 1..T:  L R = top-r SVD of (W - Q_{t-1});  Q_t = nf4(W - L R)

and the layer gets Q_T (kept as the NF4 tensor the last step made) with L R = SVD_r(W - Q_T),
split as PEFT's `loftq_utils.loftq_init` does: L = U sqrt(S), R = sqrt(S) V^T. PEFT puts A = R,
B = L, which gives Q + s L R, equal to its intent only when the adapters' scale s is 1
(lora_alpha = r); we divide both by sqrt(s) so the adapted layer starts at Q + L R for any alpha.
The quantizer is ours (torchao NF4, block 64 with double-quantized scales, as `qlora.py`), so the
base is bit-for-bit what QLoRA would have stored for the final W - L R.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunewright.modules.peft.lora import LoRALinear
from tunewright.modules.peft.nf4 import is_nf4, nf4_module
from tunewright.modules.peft.qlora import BLOCK_SIZE, SCALER_BLOCK_SIZE


def nf4_quantize(w: torch.Tensor) -> torch.Tensor:
    """QLoRA's NF4 tensor of `w` (the block sizes `quantize_base_nf4` uses)."""
    if w.numel() % BLOCK_SIZE:
        raise ValueError(f"NF4 needs a multiple of {BLOCK_SIZE} weights, got {w.numel()}")
    return nf4_module().to_nf4(w, BLOCK_SIZE, math.gcd(w.numel() // BLOCK_SIZE, SCALER_BLOCK_SIZE))


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L [out, r], R [r, in] with L R the best rank-r approximation, sqrt(S) on each side."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, *, rank: int, num_iter: int = 1,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NF4 base Q_T, L, R) for a dense [out, in] weight; Q_T has the weight's dtype, L and R are
    fp32 with Q_T + L R ≈ W. The SVDs and residuals are computed in fp32."""
    if num_iter < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {num_iter}")
    w = weight.float()
    target = w  # what the next NF4 step quantizes: W, then W - L R
    for _ in range(num_iter):
        q = nf4_quantize(target.to(weight.dtype))
        left, right = low_rank(w - q.get_original_weight().float(), rank)
        target = w - left @ right
    return q, left, right


@torch.no_grad()
def apply_loftq(model: nn.Module, *, num_iter: int = 1) -> int:
    """Give every LoRA layer of `model` an NF4 base and adapters from `loftq_init`; returns how
    many layers it initialised. The base must hold its real (dense) weights."""
    from tunewright.modules.peft.apply import expert_lora_modules, lora_modules

    for name, _ in expert_lora_modules(model):
        raise ValueError(f"init_lora_weights: loftq: {name} holds stacked experts, which NF4 cannot "
                         f"hold; set lora_experts: null")
    count = 0
    for name, module in lora_modules(model):
        assert isinstance(module, LoRALinear)
        w = module.weight
        if is_nf4(w) or w.device.type == "meta":
            raise ValueError(f"init_lora_weights: loftq needs {name}'s full-precision weights "
                             f"(it was {'already NF4' if is_nf4(w) else 'not loaded: meta device'}); "
                             "it runs on one device, after loading, before quantization")
        if module.magnitude is not None:
            raise ValueError("init_lora_weights: loftq with use_dora is not supported: set use_dora: false")
        q, left, right = loftq_init(w, rank=module.rank, num_iter=num_iter)
        root = math.sqrt(module.scale)  # the layer adds scale * B A: start at Q + L R
        module.lora_a.weight.copy_(right / root)
        module.lora_b.weight.copy_(left / root)
        module.weight = nn.Parameter(q, requires_grad=False)
        count += 1
    return count
