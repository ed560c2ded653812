"""QLoRA: the frozen base weights of adapted layers become 4-bit NF4 tensors (torchao).

Applied after `apply_lora`, so only the layers that carry adapters are quantized (embeddings,
norms and the head stay in the training dtype, as in the QLoRA paper and torchtune).
"""

from __future__ import annotations

import math

from torch import nn

from tunewright.modules.peft.apply import expert_lora_modules, lora_modules
from tunewright.modules.peft.nf4 import is_nf4, nf4_module

BLOCK_SIZE = 64  # values per NF4 scale (the paper's choice)
SCALER_BLOCK_SIZE = 256  # scales per double-quantized block


def quantize_base_nf4(model: nn.Module) -> int:
    """Quantize the base weight of every LoRA layer in place; returns how many were quantized."""
    for name, _ in expert_lora_modules(model):
        raise ValueError(f"QLoRA: torchao's NF4 tensor holds only 2-D weights, not the stacked experts "
                         f"of {name}; set experts=None (recipe key lora_experts: null) or quantize_base: false")
    nf4 = nf4_module()
    count = 0
    for name, module in lora_modules(model):
        w = module.weight
        if is_nf4(w):
            continue
        if w.numel() % BLOCK_SIZE:
            raise ValueError(f"QLoRA: {name} has {w.numel()} weights, not a multiple of the NF4 "
                             f"block size {BLOCK_SIZE}")
        # Small layers cannot fill a block of 256 scales: use the largest block that divides.
        scaler_block = math.gcd(w.numel() // BLOCK_SIZE, SCALER_BLOCK_SIZE)
        module.weight = nn.Parameter(nf4.to_nf4(w.detach(), BLOCK_SIZE, scaler_block), requires_grad=False)
        count += 1
    return count
