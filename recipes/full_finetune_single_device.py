"""Full fine-tuning on one device: every weight trains with cross-entropy on the target tokens.

    tune run full_finetune_single_device --config llama/tiny_full

Reads top to bottom: set-up, model, data, optimizer, the shared training loop, export. The train
step, gradient accumulation, validation, checkpoint/resume and logging come from
`tunewright.training`; copy this file (`tune cp full_finetune_single_device my_recipe.py`) to
change what is specific to the objective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tunewright.training.entry import recipe_main
from tunewright.training.train_config import TrainConfig


@dataclass
class Config(TrainConfig):
    pass


def main(cfg: Config) -> list[dict]:
    from tunewright.models import save_pretrained
    from tunewright.training import distributed as dist
    from tunewright.training.data_setup import make_batches
    from tunewright.training.instantiate import instantiate
    from tunewright.training.run_dir import prepare_output_dir
    from tunewright.training.setup import seed_everything, setup_device, training_dtype
    from tunewright.training.trainer import LoopSettings, Trainer, causal_lm_loss
    from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    dtype = training_dtype(cfg.dtype, device)
    prepare_output_dir(cfg)

    # ------------------------------------------------------------------ model
    model = instantiate(cfg.model, dtype=dtype, device=device)
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_blocks(model)

    # ------------------------------------------------------------------ data
    tokenizer = instantiate(cfg.tokenizer)
    batching = dict(pad_id=tokenizer.pad_id, batch_size=cfg.batch_size, seed=cfg.seed)
    train = make_batches(instantiate(cfg.dataset, tokenizer=tokenizer), shuffle=cfg.shuffle,
                         group_by_length=cfg.group_by_length, **batching)
    val = None
    if cfg.val_dataset is not None:
        val = make_batches(instantiate(cfg.val_dataset, tokenizer=tokenizer), shuffle=False, **batching)

    # ------------------------------------------------------------------ optimizer + loop
    optimizer = instantiate(cfg.optimizer, params=[p for p in model.parameters() if p.requires_grad])
    trainer = Trainer(
        LoopSettings.from_config(cfg),
        model=model,
        optimizer=optimizer,
        train_batches=train,
        val_batches=val,
        loss_fn=functools.partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size),
        metric_sink=instantiate(cfg.metric_logger, output_dir=cfg.output_dir),
        device=device,
    )
    trainer.lr_scheduler = instantiate(
        cfg.lr_scheduler, optimizer=optimizer, num_training_steps=trainer.total_steps
    )
    history = trainer.fit()

    # ------------------------------------------------------------------ export
    if cfg.save_final_model and dist.is_main():
        out = save_pretrained(model, Path(cfg.output_dir) / "final", source_dir=cfg.model.get("path"))
        print(f"saved the fine-tuned model (Hugging Face format) to {out}")
    return history


if __name__ == "__main__":
    recipe_main(__file__)
