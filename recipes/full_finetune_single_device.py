"""Full fine-tuning on one device: every weight trains with cross-entropy on the target tokens.

    tune run full_finetune_single_device --config llama/tiny_full

Reads top to bottom: set-up, model, data, the shared training loop, export. The train step,
gradient accumulation, validation, checkpoint/resume and logging come from
`tunewright.training`; copy this file (`tune cp full_finetune_single_device my_recipe.py`) to
change what is specific to the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunewright.training.entry import recipe_main
from tunewright.training.train_config import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    # Step each weight as soon as its gradient is ready and free that gradient: full gradients
    # never exist at once. Needs gradient_accumulation_steps: 1 and clip_grad_norm: null.
    optimizer_in_backward: bool = False


def main(cfg: Config) -> list[dict]:
    from tunewright.models import save_pretrained
    from tunewright.training import distributed as dist
    from tunewright.training.instantiate import instantiate
    from tunewright.training.optim_in_backward import OptimizerInBackward, check_optimizer_in_backward
    from tunewright.training.run_dir import prepare_output_dir
    from tunewright.training.setup import seed_everything, setup_device, training_dtype
    from tunewright.training.sft_setup import build_data, build_trainer
    from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

    # ------------------------------------------------------------------ set-up
    if cfg.optimizer_in_backward:
        check_optimizer_in_backward(cfg)
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    prepare_output_dir(cfg)

    # ------------------------------------------------------------------ model
    model = instantiate(cfg.model, dtype=training_dtype(cfg.dtype, device), device=device)
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_blocks(model)

    # ------------------------------------------------------------------ data + loop
    _, train, val = build_data(cfg)
    optimizer = None
    if cfg.optimizer_in_backward:
        optimizer = OptimizerInBackward(model.parameters(),
                                        lambda params: instantiate(cfg.optimizer, params=params))
    trainer = build_trainer(cfg, model, train, val, device=device, optimizer=optimizer)
    history = trainer.fit()

    # ------------------------------------------------------------------ export
    if cfg.save_final_model and dist.is_main():
        out = save_pretrained(model, Path(cfg.output_dir) / "final", source_dir=cfg.model.get("path"))
        print(f"saved the fine-tuned model (Hugging Face format) to {out}")
    return history


if __name__ == "__main__":
    recipe_main(__file__)
