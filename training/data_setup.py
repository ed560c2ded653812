"""From the config's tokenizer and datasets to the resumable batches a training loop iterates."""

from __future__ import annotations

import functools
from typing import Any

from tunewright.data.collate import collate_padded
from tunewright.data.sampler import ResumableSampler
from tunewright.training import distributed as dist
from tunewright.training.batching import Batches
from tunewright.training.instantiate import instantiate


def make_batches(
    dataset: Any,
    *,
    pad_id: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    group_by_length: bool = False,
) -> Batches:
    """Batches of this rank's shard, in a seeded order that `state_dict` can resume."""
    lengths = getattr(dataset, "lengths", None) if group_by_length else None
    if group_by_length and lengths is None:
        raise ValueError("group_by_length: this dataset does not expose item lengths (packed data "
                         "needs no grouping: every row has max_seq_len tokens)")
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=dist.data_rank(),
        world_size=dist.data_world_size(),
        group_by_length=group_by_length, lengths=lengths, batch_size=batch_size,
    )
    return Batches(dataset, sampler, batch_size, functools.partial(collate_padded, pad_id=pad_id))


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
