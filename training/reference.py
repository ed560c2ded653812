"""The reference policy of preference recipes (DPO and friends, KTO): log π_ref of a batch's rows.

    reference = Reference.adapters_off(policy)          # LoRA: the same model, adapters disabled
    reference = Reference.frozen(place.load_model(...)) # full fine-tuning: a frozen copy
    reference = Reference.precomputed()                  # values the batches carry (below)
    ref_logps = reference.logps(batch)                   # [rows], no gradient

With LoRA the reference costs no memory: the frozen base is already there. A full fine-tune
either keeps a frozen copy (sharded like the policy under FSDP2) or runs `precompute` once
before training: the policy still has its pretrained weights then, so it IS the reference; the
values are cached in the run's output directory (keyed by the data's token ids and the model
config) so a resumed run reads them instead of passing over the data again, and every item of
the dataset carries its values from then on (`with_reference`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.batching import Batch, Batches, global_sum, to_device

CACHE_NAME = "reference_logps_{split}.pt"


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    # The reference has no dropout and no gradient.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class Reference:
    def __init__(self, logps: Callable[[Batch], torch.Tensor]) -> None:
        self._logps = logps

    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs of each row's target tokens under the reference, [rows]."""
        return self._logps(batch)

    @classmethod
    def adapters_off(cls, policy: nn.Module, **options: Any) -> "Reference":
        from tunewright.modules.peft.apply import adapters_disabled
        from tunewright.training.objectives import sequence_logprobs

        def logps(batch: Batch) -> torch.Tensor:
            with _evaluating(policy), adapters_disabled(policy):
                return sequence_logprobs(policy, batch, **options)[0]

        return cls(logps)

    @classmethod
    def of(cls, model: nn.Module, **options: Any) -> "Reference":
        """`model` as it is now, in eval mode: a frozen copy, or the policy before any step."""
        from tunewright.training.objectives import sequence_logprobs

        def logps(batch: Batch) -> torch.Tensor:
            with _evaluating(model):
                return sequence_logprobs(model, batch, **options)[0]

        return cls(logps)

    @classmethod
    def frozen(cls, model: nn.Module, **options: Any) -> "Reference":
        """A separate reference model, which never trains."""
        model.requires_grad_(False)
        return cls.of(model, **options)

    @classmethod
    def precomputed(cls) -> "Reference":
        """Values the batch carries: pairs' `ref_chosen_logps` then `ref_rejected_logps`."""
        return cls(lambda batch: torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]))


def cache_key(dataset: Any, model_cfg: Any, dtype: str) -> str:
    """What the cached values depend on: every token id of the data, the model and its dtype."""
    text = json.dumps({"data": dataset.fingerprint(), "model": model_cfg, "dtype": dtype}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def precompute(
    reference: Reference,
    batches: Batches,
    *,
    device: torch.device,
    cache_dir: Path,
    split: str,
    key: str,
) -> torch.Tensor:
    """Reference log-probs of every pair of `batches.dataset`, [N, 2] float32 (chosen,
    rejected): read from `cache_dir` when a cache with `key` is there, else computed (each rank
    a share of the batches, summed) and cached by rank 0."""
    path = cache_dir / CACHE_NAME.format(split=split)
    dataset = batches.dataset
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key and saved["logps"].shape[0] == len(dataset):
            if dist.is_main():
                print(f"reference log-probs: read from {path}", flush=True)
            return saved["logps"]
    n, size = len(dataset), batches.batch_size
    chunks = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    table = torch.zeros(n, 2, dtype=torch.float32, device=device)
    # Every rank runs the same number of forwards (FSDP gathers weights in each); a rank out of
    # chunks repeats its last one and discards it.
    rank, world = dist.data_rank(), dist.data_world_size()
    for turn in range(math.ceil(len(chunks) / world)):
        index = turn * world + rank
        chunk = chunks[min(index, len(chunks) - 1)]
        batch = to_device(batches.collate([dataset[i] for i in chunk]), device)
        values = reference.logps(batch).float().view(2, -1).T  # [B, 2]
        if index < len(chunks):
            table[chunk] = values
    global_sum(table)
    table = table.cpu()
    if dist.is_main():  # under a temporary name, then renamed: a killed run leaves no half file
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        torch.save({"key": key, "logps": table}, tmp)
        os.replace(tmp, path)
        print(f"reference log-probs: {n} pairs computed once, cached in {path}", flush=True)
    return table


class WithReference(torch.utils.data.Dataset):
    """A pair dataset whose items also carry their reference log-probs (for `collate_pairs`)."""

    def __init__(self, dataset: Any, table: torch.Tensor) -> None:
        self.dataset, self.table = dataset, table.tolist()
        self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # lengths, source, fingerprint, ...
        if name.startswith("__") or "dataset" not in self.__dict__:  # pickling (DataLoader workers)
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, rejected = self.table[index]
        return {**self.dataset[index], "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def with_reference(batches: Batches, table: torch.Tensor) -> None:
    """From now on every batch of `batches` carries its precomputed reference log-probs."""
    batches.dataset = WithReference(batches.dataset, table)
