"""The adapter step both LoRA recipes share: `apply_lora` with the `LoRAConfig` keys, and the
early checks on what the run will be able to export."""

from __future__ import annotations

from typing import Any

from torch import nn


def adapt_model(model: nn.Module, cfg: Any) -> tuple[list[str], bool]:
    """Put adapters on `model` (real or on the meta device) as the config asks.

    Returns the adapted layers and whether a PEFT adapter can be written: PEFT's format has no
    place yet for LoRA on stacked MoE experts (checkpoints still hold it, so resume works, and
    `save_final_model` writes the merged model).
    """
    from tunewright.models.peft_adapter import adapter_groups
    from tunewright.modules.peft.apply import apply_lora, expert_lora_modules
    from tunewright.training import distributed as dist

    adapted = apply_lora(model, targets=cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                         experts=cfg.lora_experts)
    peft_ok = next(expert_lora_modules(model), None) is None
    if not peft_ok and cfg.save_adapter and dist.is_main():
        print("save_adapter: no PEFT adapter is written, PEFT's format cannot hold LoRA on "
              "mixture-of-experts experts yet; save_final_model=true writes the merged model")
    if peft_ok:
        adapter_groups(model)  # fails now, not at the first save, if targets split a fused layer
    return adapted, peft_ok
