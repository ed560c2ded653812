"""The shared training core: batches -> train step -> schedule -> log / validate / checkpoint.

Every recipe uses this loop; what is new about a recipe is its `loss_fn(model, batch)` (which
returns the *sum* of per-token losses and the number of target tokens), which parameters are
trainable, and what `export(dir)` writes. Gradient accumulation divides by the target tokens of
the whole optimizer step (summed over micro-batches and ranks), so 2 x batch 2 is the same
update as 1 x batch 4.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from tunewright.training.metrics import MetricsWriter, format_record, peak_rss_mb
from tunewright.training.offload import activation_offloading
from tunewright.training.progress import progress_bar

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


@dataclass
class LoopSettings:
    """The subset of a recipe config that the loop reads (see `TrainConfig`)."""

    output_dir: str
    batch_size: int
    epochs: int = 1
    gradient_accumulation_steps: int = 1
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None
    clip_grad_norm: float | None = 1.0
    log_every_n_steps: int = 1
    eval_every_n_steps: int | None = None
    max_eval_batches: int | None = None
    save_every_n_steps: int | None = None
    keep_last_n_checkpoints: int | None = 2
    resume_from_checkpoint: bool | str = False
    progress_bar: bool = True
    padding_free: bool = True  # the loss computes real tokens only: what `num_tokens_total` counts
    enable_activation_offloading: bool = False  # saved activations wait on the CPU (offload.py)

    @classmethod
    def from_config(cls, cfg: Any) -> "LoopSettings":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


class Batches:
    """Collated batches of a dataset in sampler order; the sampler holds the resumable position."""

    def __init__(self, dataset: Any, sampler: Any, batch_size: int, collate: Callable[[list], Batch]) -> None:
        self.dataset, self.sampler, self.batch_size, self.collate = dataset, sampler, batch_size, collate

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        buf: list[int] = []
        for idx in self.sampler:
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield self.collate([self.dataset[i] for i in buf])
                buf = []
        if buf:
            yield self.collate([self.dataset[i] for i in buf])


def causal_lm_loss(
    model: nn.Module, batch: Batch, *, chunk_size: int = 1024, padding_free: bool = True
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's targets, and their number.

    `padding_free` computes only real tokens (see `training/unpad.py`); the result is the same
    as on the padded batch, up to float rounding.
    """
    from tunewright.modules.loss import chunked_cross_entropy
    from tunewright.training.unpad import flatten_batch

    if padding_free and ("seq_lens" in batch or "doc_ids" in batch):
        flat = flatten_batch(batch)
        hidden = model(flat["tokens"], input_pos=flat["input_pos"], seq_lens=flat["seq_lens"],
                       hidden_only=True)
        labels = flat["labels"]
    else:
        hidden = model(batch["tokens"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"),
                       hidden_only=True)
        labels = batch["labels"]
    return chunked_cross_entropy(hidden, labels, model.head, chunk_size=chunk_size,
                                 head_weight=model.head_weight())


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _count(batch: Batch, key: str) -> int:
    """Token counts of a collated batch: `num_tokens` (non-padding), `num_targets` (labels that
    count in the loss), `num_tokens_total` (what the model computes on, padding included)."""
    if key in batch:
        return int(batch[key])
    if key == "num_targets":
        return int((batch["labels"] != -100).sum())
    return int(batch["tokens"].numel())


class LocalCheckpointer:
    """Step checkpoints as whole tensors written by rank 0 (`training/checkpointing.py`)."""

    def save(self, output_dir: str, step: int, **kwargs: Any) -> Path | None:
        path = save_checkpoint(output_dir, step, **kwargs) if dist.is_main() else None
        dist.barrier()
        return path

    def load(self, step_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return load_checkpoint(step_dir, model=model, optimizer=optimizer)

    def wait(self) -> None:
        """Saves are synchronous: nothing is ever pending."""


class Trainer:
    def __init__(
        self,
        settings: LoopSettings,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_batches: Batches,
        loss_fn: LossFn,
        lr_scheduler: Any = None,
        val_batches: Batches | None = None,
        export: Callable[[Path], None] | None = None,
        metric_sink: Any = None,
        device: torch.device | str = "cpu",
        checkpointer: Any = None,
    ) -> None:
        self.s = settings
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.train_batches, self.val_batches = train_batches, val_batches
        self.loss_fn, self.export = loss_fn, export
        self.device = torch.device(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        g = settings.gradient_accumulation_steps
        per_epoch = math.ceil(len(train_batches) / g)
        if settings.max_steps_per_epoch is not None:
            per_epoch = min(per_epoch, settings.max_steps_per_epoch)
        self.steps_per_epoch = per_epoch
        total = per_epoch * settings.epochs
        self.total_steps = min(total, settings.max_steps) if settings.max_steps else total
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.metric_sink = metric_sink
        # How step checkpoints are written and read: the single-device files by default; a
        # distributed recipe passes a sharded one (same methods, see `LocalCheckpointer`).
        self.checkpointer = checkpointer or LocalCheckpointer()

    # ---------------------------------------------------------------- resume
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "sampler": self.train_batches.sampler.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def _resume(self) -> int | None:
        step_dir = resolve_resume(self.s.output_dir, self.s.resume_from_checkpoint)
        if step_dir is None:
            return None
        state = self.checkpointer.load(step_dir, model=self.model, optimizer=self.optimizer)
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.train_batches.sampler.load_state_dict(state["sampler"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return self.step

    def save(self) -> Path | None:
        return self.checkpointer.save(
            self.s.output_dir, self.step, model=self.model, optimizer=self.optimizer,
            trainer_state=self._trainer_state(), export=self.export,
            keep_last=self.s.keep_last_n_checkpoints,
        )

    # ---------------------------------------------------------------- steps
    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, Any]:
        """One optimizer step over `micro_batches`; returns the step's metrics."""
        self.model.train()
        num_targets = torch.tensor(float(sum(_count(b, "num_targets") for b in micro_batches)))
        dist.all_reduce_sum(num_targets)
        denom = max(num_targets.item(), 1.0)
        loss_sum = 0.0
        for batch in micro_batches:
            with activation_offloading(self.s.enable_activation_offloading):
                loss, _ = self.loss_fn(self.model, _to_device(batch, self.device))
            (loss / denom).backward()
            loss_sum += loss.detach().float().item()
        grad_norm = None
        if self.s.clip_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.s.clip_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        total = torch.tensor(loss_sum)
        dist.all_reduce_sum(total)
        return {"loss": total.item() / denom, "lr": lr, "grad_norm": grad_norm,
                "num_targets": int(num_targets.item())}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        self.model.eval()
        totals = torch.zeros(2)
        for i, batch in enumerate(self.val_batches):
            if self.s.max_eval_batches is not None and i >= self.s.max_eval_batches:
                break
            loss, n = self.loss_fn(self.model, _to_device(batch, self.device))
            totals += torch.tensor([loss.float().item(), float(n)])
        dist.all_reduce_sum(totals)
        self.model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    # ---------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, Any]]:
        resumed_at = self._resume()
        writer = MetricsWriter(self.s.output_dir, resume_step=resumed_at, sink=self.metric_sink)
        history: list[dict[str, Any]] = []
        bar = progress_bar(total=self.total_steps, initial=self.step, enabled=dist.is_main(),
                           show_bar=self.s.progress_bar)
        g = self.s.gradient_accumulation_steps
        try:
            while self.step < self.total_steps and self.epoch < self.s.epochs:
                if self.step_in_epoch == 0:
                    self.train_batches.sampler.set_epoch(self.epoch)
                batches = iter(self.train_batches)
                t0 = time.perf_counter()
                while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    micro = [b for _, b in zip(range(g), batches)]
                    if not micro:
                        break
                    m = self.train_step(micro)
                    self.step += 1
                    self.step_in_epoch += 1
                    now = time.perf_counter()
                    num_tokens = sum(_count(b, "num_tokens") for b in micro)
                    record = {
                        "step": self.step, "epoch": self.epoch, "loss": m["loss"], "lr": m["lr"],
                        "grad_norm": m["grad_norm"], "tokens_per_second": num_tokens / (now - t0),
                        "num_tokens": num_tokens,
                        "num_tokens_total": sum(  # tokens the model computed on
                            _count(b, "num_tokens" if self.s.padding_free else "num_tokens_total")
                            for b in micro),
                        "num_targets": m["num_targets"], "step_time": now - t0, "time": time.time(),
                        "peak_rss_mb": round(peak_rss_mb(), 1),
                    }
                    history.append(record)
                    if self.step % self.s.log_every_n_steps == 0 or self.step == self.total_steps:
                        writer.log(record)
                        bar.log(format_record(record))
                    bar.update(loss=m["loss"], tokens_per_second=record["tokens_per_second"])
                    every = self.s.eval_every_n_steps
                    if every and (self.step % every == 0 or self.step == self.total_steps):
                        val = self.evaluate()
                        if val is not None:
                            val_record = {"step": self.step, "val_loss": val, "time": time.time()}
                            writer.log(val_record)
                            bar.log(format_record(val_record))
                    if self.s.save_every_n_steps and self.step % self.s.save_every_n_steps == 0:
                        self.save()
                    t0 = time.perf_counter()
                self.epoch += 1
                self.step_in_epoch = 0
            self.checkpointer.wait()  # an async checkpoint is complete before the run ends
        finally:
            bar.close()
            writer.close()
        return history
