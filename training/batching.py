"""Batches in a training loop: the micro-batches of each optimizer step, epoch by epoch, with a
position a checkpoint can hold; moving them to the device; counts summed over ranks.

    data = StepBatches(train, gradient_accumulation_steps=2, epochs=1, max_steps=100)
    for step in run.steps(data.total_steps):
        micro_batches = data.next()                  # 2 collated batches
        num_targets = target_count(micro_batches, device=device)  # this step, every rank
        for batch in micro_batches:
            loss, _ = causal_lm_loss(model, to_device(batch, device))
            (loss / num_targets).backward()

Dividing every micro-batch's summed loss by the targets of the whole step, over all
data-parallel ranks, is what makes 2 micro-batches of 2 rows (or 2 ranks of 2 rows) the same
update as 1 batch of 4.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from tunewright.training import distributed as dist

Batch = dict[str, Any]


class Batches:
    """Collated batches of a dataset in sampler order, with the position a checkpoint saves.

    With `num_workers`, DataLoader worker processes collate the batches ahead of the loop (and
    with `pin_memory` a thread copies them into page-locked memory, so `to_device` copies to a
    GPU asynchronously); the batches and their order are the same as without. The workers pull
    indices from the sampler ahead of the loop, so the position saved (`state_dict`) is that of
    the batches handed out so far, not the sampler's own.
    """

    def __init__(self, dataset: Any, sampler: Any, batch_size: int, collate: Callable[[list], Batch], *,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.sampler, self.batch_size, self.collate = dataset, sampler, batch_size, collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._position: tuple[int, int] | None = None  # (epoch, index) after the batches handed out

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """The batches from the sampler's position to the end of its epoch."""
        epoch, index = getattr(self.sampler, "epoch", 0), getattr(self.sampler, "index", 0)
        size = len(self.sampler)
        # the sampler's rule: handing out the last index of an epoch moves to the next one
        self._position = (epoch + 1, 0) if index >= size else (epoch, index)
        return self._counted(self._collated(iter(self.sampler)), epoch, index, size)

    def _counted(self, batches: Iterator[Batch], epoch: int, index: int, size: int) -> Iterator[Batch]:
        for batch in batches:
            index = min(index + self.batch_size, size)
            self._position = (epoch + 1, 0) if index >= size else (epoch, index)
            yield batch

    def first_epoch(self) -> Iterator[Batch]:
        """Every batch of epoch 0 from its start, leaving the position alone: a held-out pass
        reads the same rows each time it runs."""
        return self._collated(iter(self.sampler.epoch_indices(0)))

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the batches handed out (its own before any was)."""
        if self._position is None:
            return self.sampler.state_dict()
        return self.sampler.state_dict(position=self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._position = None

    def _collated(self, indices: Iterator[int]) -> Iterator[Batch]:
        chunks = _Chunks(indices, self.batch_size)
        if not self.num_workers and not self.pin_memory:  # in this thread, no DataLoader machinery
            return (self.collate([self.dataset[i] for i in chunk]) for chunk in chunks)
        # A generator of its own: the loader draws its workers' base seed from it, not from
        # torch's global generator, whose state the run's results depend on.
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=chunks, collate_fn=self.collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator()))


class _Chunks:
    """Lists of `size` consecutive indices (the last one shorter): a DataLoader's batch sampler."""

    def __init__(self, indices: Iterator[int], size: int) -> None:
        self.indices, self.size = indices, size

    def __iter__(self) -> Iterator[list[int]]:
        while chunk := list(itertools.islice(self.indices, self.size)):
            yield chunk


class StepBatches:
    """The micro-batches of each optimizer step: `gradient_accumulation_steps` batches, or fewer
    at the end of an epoch; at most `max_steps_per_epoch` steps an epoch, `epochs` epochs and
    `max_steps` steps in all (`total_steps`).

    Its state (epoch, steps taken in it, the sampler's position) goes into checkpoints, so a
    resumed run gets the batches an uninterrupted one would have.
    """

    def __init__(
        self,
        batches: Batches,
        *,
        gradient_accumulation_steps: int = 1,
        epochs: int = 1,
        max_steps_per_epoch: int | None = None,
        max_steps: int | None = None,
    ) -> None:
        for key, value in (("gradient_accumulation_steps", gradient_accumulation_steps), ("epochs", epochs),
                           ("max_steps_per_epoch", max_steps_per_epoch), ("max_steps", max_steps)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}"
                                 + (" (null: no limit)" if key.startswith("max_") else ""))
        self.batches = batches
        self.accumulate = gradient_accumulation_steps
        self.epochs = epochs
        per_epoch = math.ceil(len(batches) / gradient_accumulation_steps)
        if max_steps_per_epoch is not None:
            per_epoch = min(per_epoch, max_steps_per_epoch)
        self.steps_per_epoch = per_epoch
        total = per_epoch * epochs
        self.total_steps = min(total, max_steps) if max_steps is not None else total
        if self.total_steps < 1:
            raise ValueError("the data gives no optimizer step: the dataset is empty "
                             f"({len(batches)} batches of {batches.batch_size})")
        self.epoch = 0
        self.step_in_epoch = 0
        self._iter: Iterator[Batch] | None = None

    @classmethod
    def from_config(cls, batches: Batches, cfg: Any) -> "StepBatches":
        """From a training config's `gradient_accumulation_steps`, `epochs`,
        `max_steps_per_epoch` and `max_steps` (training/train_config.py)."""
        return cls(batches, gradient_accumulation_steps=cfg.gradient_accumulation_steps, epochs=cfg.epochs,
                   max_steps_per_epoch=cfg.max_steps_per_epoch, max_steps=cfg.max_steps)

    def next(self) -> list[Batch]:
        """The micro-batches of the next optimizer step."""
        while True:
            if self.step_in_epoch >= self.steps_per_epoch:
                self._start_epoch(self.epoch + 1)
            if self.epoch >= self.epochs:
                raise RuntimeError(f"StepBatches: all {self.epochs} epochs are used up (total_steps {self.total_steps})")
            if self._iter is None:
                if self.step_in_epoch == 0:
                    self.batches.sampler.set_epoch(self.epoch)
                self._iter = iter(self.batches)  # continues from the sampler's position
            micro = list(itertools.islice(self._iter, self.accumulate))
            if micro:
                self.step_in_epoch += 1
                return micro
            self._start_epoch(self.epoch + 1)  # this epoch ran out of batches early

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch, self._iter = epoch, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "sampler": self.batches.state_dict()}  # the batches consumed, not prefetched

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["sampler"])
        self.epoch, self.step_in_epoch, self._iter = state["epoch"], state["step_in_epoch"], None


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the data-parallel ranks, in place (a no-op in one process). The tensor
    must be on the model's device: NCCL takes no CPU tensors."""
    return dist.all_reduce_sum(x)


def _count(batch: Batch, key: str) -> int:
    """A collated batch's counts (`data/collate.py`): `num_tokens` (non-padding), `num_targets`
    (labels that count in the loss); `num_tokens_total` is what a padded forward computes."""
    if key in batch:
        return int(batch[key])
    if key == "num_targets":
        return int((batch["labels"] != -100).sum())
    return int(batch["tokens"].numel())


def target_count(micro_batches: Sequence[Batch], *, device: torch.device | str) -> torch.Tensor:
    """Target tokens of one optimizer step over all data-parallel ranks: a float tensor on
    `device`, at least 1 (a step without targets then adds nothing)."""
    n = torch.tensor(float(sum(_count(b, "num_targets") for b in micro_batches)), device=device)
    return global_sum(n).clamp_(min=1.0)


def token_counts(micro_batches: Sequence[Batch], *, padding_free: bool = True) -> dict[str, int]:
    """This rank's tokens of one step, for throughput: `num_tokens` (real tokens) and
    `num_tokens_total` (tokens the model computed on: padding too unless padding-free)."""
    return {"num_tokens": sum(_count(b, "num_tokens") for b in micro_batches),
            "num_tokens_total": sum(_count(b, "num_tokens" if padding_free else "num_tokens_total")
                                    for b in micro_batches)}
