"""A distributed, resumable sampler: same order every run, continue mid-epoch after a restart.

The order of an epoch depends only on ``(seed, epoch, rank, world_size)``: a permutation from
``torch.Generator().manual_seed(seed + epoch)`` (or the identity without `shuffle`), optionally
length-grouped, then padded (or cut, with `drop_last`) to a multiple of `world_size`, of which
each rank takes every `world_size`-th index starting at `rank`. Resuming recomputes that order
and skips what was consumed, so the next index equals that of an uninterrupted run.

Epochs: handing out the last index of an epoch moves the sampler to the next epoch, so a
checkpoint taken after a full epoch resumes in the next one, and forgetting `set_epoch` does not
replay the same order. `set_epoch(e)` with a different epoch starts epoch `e` from its
beginning; with the current epoch it keeps the position, so a resumed loop may call it as usual.

Checkpoints: `state_dict()` counts the indices this sampler has yielded. A DataLoader with
workers pulls indices ahead of the training step (prefetch), so what a checkpoint needs is the
position of the batches consumed: `state_dict(position=(epoch, index))` describes that one
(`training/batching.py` `Batches` does, counting the batches it hands out).

Another number of ranks: the state also records `world_size` and `consumed`, the position in
the epoch's global order (``index * world_size``: ranks take turns, so after `index` each, the
first `consumed` indices are used). A run resumed on a different world size continues at that
position, e.g. 2 ranks at index n -> 1 rank at index 2n; a position the new world size does not
divide has no exact continuation and fails. Keep the global batch (batch_size x world_size)
equal so steps stay the same; length grouping even requires it (its megabatches span it).
A state without `world_size` (a recipe's own count) is taken as this sampler's world size.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices of one rank's shard of a `num_samples`-item dataset, epoch by epoch.

    With `group_by_length`, each megabatch of ``50 * batch_size * world_size`` consecutive
    indices of the shuffled order is sorted by `lengths`, longest first, so the batches cut
    from it pad little while the megabatches themselves stay in random order.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        group_by_length: bool = False,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        megabatch_batches: int = 50,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        if group_by_length:
            if lengths is None or len(lengths) != num_samples:
                raise ValueError("group_by_length needs lengths, one per sample")
            if batch_size < 1 or megabatch_batches < 1:
                raise ValueError("batch_size and megabatch_batches must be positive")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.lengths = torch.as_tensor(lengths, dtype=torch.long) if group_by_length else None
        self.megabatch_size = megabatch_batches * batch_size * world_size
        self.epoch = 0
        self.index = 0  # indices of this epoch already yielded by this rank

    def __len__(self) -> int:
        """Indices per rank in a full epoch (not what is left of a resumed one)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.index = 0

    def state_dict(self, position: tuple[int, int] | None = None) -> dict[str, int]:
        """This sampler's state, or with `position` (epoch, index) the state of that position."""
        epoch, index = position if position is not None else (self.epoch, self.index)
        state = {"epoch": epoch, "index": index, "world_size": self.world_size,
                 "consumed": index * self.world_size}
        if self.group_by_length:
            state["megabatch_size"] = self.megabatch_size
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved_megabatch = state.get("megabatch_size")
        if self.group_by_length and saved_megabatch not in (None, self.megabatch_size):
            raise ValueError(
                f"sampler state: length grouping used megabatches of {saved_megabatch} samples, this "
                f"run {self.megabatch_size}; resume with the same batch_size x world_size")
        world_size = int(state.get("world_size", self.world_size))
        index = int(state["index"])
        if world_size != self.world_size:
            consumed = int(state.get("consumed", index * world_size))
            index = self._index_at(consumed, f"epoch {state['epoch']}, {world_size} ranks")
        if not 0 <= index <= len(self):
            raise ValueError(f"sampler state index {index} outside 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self.index = index

    def _index_at(self, consumed: int, saved: str) -> int:
        """This rank's index at global position `consumed` of the epoch's order."""
        if consumed >= len(self) * self.world_size:  # this world size's epoch is used up
            return len(self)
        if consumed % self.world_size:
            raise ValueError(
                f"sampler state: the checkpoint stopped after {consumed} samples ({saved}), which "
                f"{self.world_size} ranks cannot continue exactly ({consumed} is not a multiple of "
                f"{self.world_size}); resume on a number of ranks that divides it")
        return consumed // self.world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of epoch `epoch`, whatever the position (e.g. a full pass over
        held-out data that never moves the position)."""
        saved, self.epoch = self.epoch, epoch
        try:
            return self._epoch_order()[self.rank :: self.world_size]
        finally:
            self.epoch = saved

    def __iter__(self) -> Iterator[int]:
        shard = self._epoch_order()[self.rank :: self.world_size]
        if self.index >= len(shard):  # resumed at the very end of an epoch: nothing is left
            self.epoch, self.index = self.epoch + 1, 0
            return
        for position in range(self.index, len(shard)):
            # Advance before handing out the last index, so that the state saved after it
            # already points at the next epoch, whether or not the consumer asks again.
            if position + 1 == len(shard):
                self.epoch, self.index = self.epoch + 1, 0
            else:
                self.index = position + 1
            yield shard[position]

    def _epoch_order(self) -> list[int]:
        """The global order of `self.epoch`, a multiple of `world_size` long."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.group_by_length:
            assert self.lengths is not None
            grouped = []
            for megabatch in torch.split(order, self.megabatch_size):
                # stable: equal lengths keep their shuffled order, so the result is deterministic
                by_length = torch.sort(self.lengths[megabatch], descending=True, stable=True)
                grouped.append(megabatch[by_length.indices])
            order = torch.cat(grouped) if grouped else order
        indices = order.tolist()
        total = len(self) * self.world_size
        if total > len(indices):  # pad by repeating from the start, as DistributedSampler does
            repeats = -(-total // max(len(indices), 1))
            indices = (indices * repeats)[:total]
        return indices[:total]
