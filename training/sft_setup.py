"""The set-up every supervised recipe shares: tokenizer and batches from the config, and the
trainer wired to the config's optimizer, schedule and logger. A recipe calls these in order and
adds only what is new about it (which weights train, what it exports)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training.data_setup import make_batches
from tunewright.training.instantiate import instantiate
from tunewright.training.trainer import Batches, LoopSettings, Trainer, causal_lm_loss


def build_data(cfg: Any) -> tuple[Any, Batches, Batches | None]:
    """(tokenizer, train batches, validation batches or None) from `tokenizer`, `dataset`,
    `val_dataset`, `batch_size`, `shuffle`, `group_by_length` and `seed`."""
    tokenizer = instantiate(cfg.tokenizer)
    batching = dict(pad_id=tokenizer.pad_id, batch_size=cfg.batch_size, seed=cfg.seed)
    train = make_batches(instantiate(cfg.dataset, tokenizer=tokenizer), shuffle=cfg.shuffle,
                         group_by_length=cfg.group_by_length, **batching)
    val = None
    if cfg.val_dataset is not None:
        val = make_batches(instantiate(cfg.val_dataset, tokenizer=tokenizer), shuffle=False, **batching)
    return tokenizer, train, val


def build_trainer(
    cfg: Any,
    model: nn.Module,
    train: Batches,
    val: Batches | None,
    *,
    device: torch.device,
    export: Callable[[Path], None] | None = None,
    loss_fn: Callable | None = None,
    checkpointer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Trainer:
    """The shared loop with the config's optimizer (over trainable parameters) and schedule;
    `optimizer` replaces the config's (e.g. `training/optim_in_backward.py`)."""
    if optimizer is None:
        optimizer = instantiate(cfg.optimizer, params=[p for p in model.parameters() if p.requires_grad])
    trainer = Trainer(
        LoopSettings.from_config(cfg),
        model=model,
        optimizer=optimizer,
        train_batches=train,
        val_batches=val,
        loss_fn=loss_fn or functools.partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size,
                                             padding_free=cfg.padding_free),
        metric_sink=instantiate(cfg.metric_logger, output_dir=cfg.output_dir),
        export=export,
        device=device,
        checkpointer=checkpointer,
    )
    trainer.lr_scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer,
                                       num_training_steps=trainer.total_steps)
    return trainer
