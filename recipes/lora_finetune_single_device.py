"""LoRA / QLoRA / DoRA fine-tuning on one device: only low-rank adapters train.

    tune run lora_finetune_single_device --config llama/tiny_lora

What is new against full fine-tuning: adapters are put on the chosen layers (and the frozen
base quantized to NF4 for QLoRA), every checkpoint and the end of training write the adapter
in PEFT format, and the merged model is written in Hugging Face format when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tunewright.training.entry import recipe_main
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig):
    pass


def main(cfg: Config) -> list[dict]:
    from tunewright.models import save_pretrained
    from tunewright.models.peft_adapter import save_peft_adapter, write_peft_adapter
    from tunewright.modules.peft.apply import merge_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4
    from tunewright.training import distributed as dist
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import adapt_model
    from tunewright.training.run_dir import prepare_output_dir
    from tunewright.training.setup import seed_everything, setup_device, training_dtype
    from tunewright.training.sft_setup import build_data, build_trainer
    from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    prepare_output_dir(cfg)
    base_path = cfg.model.get("path")

    # ------------------------------------------------------------------ model + adapters
    model = instantiate(cfg.model, dtype=training_dtype(cfg.dtype, device), device=device)
    adapted, peft_ok = adapt_model(model, cfg)
    if cfg.quantize_base:
        quantize_base_nf4(model)
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_blocks(model)
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.is_main():
        print(f"LoRA on {len(adapted)} layers: {num_trainable:,} trainable parameters")

    # ------------------------------------------------------------------ data + loop
    _, train, val = build_data(cfg)
    export = partial(write_peft_adapter, model, base_model_path=base_path) if peft_ok else None
    trainer = build_trainer(cfg, model, train, val, device=device, export=export)
    history = trainer.fit()

    # ------------------------------------------------------------------ export
    if dist.is_main():
        out = Path(cfg.output_dir)
        if cfg.save_adapter and peft_ok:
            print(f"saved the adapter (PEFT format) to {save_peft_adapter(model, out / 'adapter', base_model_path=base_path)}")
        if cfg.save_final_model:
            merge_lora(model)
            merged = save_pretrained(model, out / "merged", source_dir=base_path, dtype=cfg.dtype)
            print(f"saved the merged model (Hugging Face format) to {merged}")
    return history


if __name__ == "__main__":
    recipe_main(__file__)
