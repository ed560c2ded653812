"""LoRA from a recipe's `LoRAConfig` keys: put the adapters on a built model (real or on the meta
device), and say early what the run will be able to export."""

from __future__ import annotations

from typing import Any

from torch import nn


def add_lora(model: nn.Module, cfg: Any) -> list[str]:
    """`apply_lora` with the config's keys; returns the adapted layer paths. Fails now, not at
    the first checkpoint, if the targets split a fused layer of the checkpoint format."""
    from tunewright.models.peft_adapter import adapter_groups
    from tunewright.modules.peft.apply import apply_lora

    adapted = apply_lora(model, targets=cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                         experts=cfg.lora_experts)
    if getattr(cfg, "init_lora_weights", True) == "loftq":
        from tunewright.modules.peft.loftq import apply_loftq

        if not cfg.quantize_base:
            raise ValueError("init_lora_weights: loftq initialises adapters for an NF4 base: set "
                             "quantize_base: true (QLoRA), or init_lora_weights: true")
        apply_loftq(model, num_iter=cfg.loftq_iter)
    if has_peft_format(model):
        adapter_groups(model)
    return adapted


def check_score_head_targets(cfg: Any) -> None:
    """A score head (reward models) trains whole, so it is never a LoRA target: say so before
    any work."""
    from tunewright.modules.peft.apply import normalize_targets

    if cfg.lora_rank is not None and "output" in normalize_targets(cfg.lora_targets):
        raise ValueError("lora_targets: 'output' is the score head, which trains whole; leave it out")


def add_lora_with_score_head(model: nn.Module, cfg: Any) -> list[str]:
    """`add_lora` on a model with a score head, which trains whole: it is usually new (PEFT's
    `modules_to_save`)."""
    adapted = add_lora(model, cfg=cfg)
    model.output.weight.requires_grad_(True)
    return adapted


def has_peft_format(model: nn.Module) -> bool:
    """Whether PEFT's format can hold the model's adapters: it has no place yet for LoRA on
    stacked MoE experts (checkpoints still hold them, so resume works, and `save_final_model`
    writes the merged model)."""
    from tunewright.modules.peft.apply import expert_lora_modules

    return next(expert_lora_modules(model), None) is None


def peft_adapter_ok(model: nn.Module, cfg: Any) -> bool:
    """`has_peft_format`, saying once (rank 0) why no adapter will be written when it is false
    and the config asks for one."""
    from tunewright.training import distributed as dist

    ok = has_peft_format(model)
    if not ok and cfg.save_adapter and dist.is_main():
        print("save_adapter: no PEFT adapter is written, PEFT's format cannot hold LoRA on "
              "mixture-of-experts experts yet; save_final_model=true writes the merged model")
    if ok and getattr(cfg, "init_lora_weights", True) == "loftq":
        # The adapter corrects LoftQ's NF4 base, not the checkpoint's weights: on the original
        # model it would add that correction to weights that never had the error.
        if cfg.save_adapter and dist.is_main():
            print("save_adapter: no PEFT adapter is written, a LoftQ adapter belongs to its NF4 base, "
                  "not to the checkpoint; the merged model is written (unless save_final_model: false)")
        return False
    return ok
