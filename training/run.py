"""The run: its output directory, step counter, resume, metrics, progress and checkpoints.

    run = Run.from_config(cfg)                    # creates output_dir, saves config.yaml
    run.resume(state)                             # a TrainState: loads the checkpoint asked for
    for step in run.steps(total_steps):           # from the resumed step on; progress bar, ETA
        ...                                       # the recipe's own step
        if run.due(cfg.log_every_n_steps, final=True):
            run.log(loss=loss, lr=lr, my_metric=x)    # any keys: stdout, metrics.jsonl, logger
        if run.due(cfg.save_every_n_steps):
            run.save(state, export=write_adapter)  # atomic step_<N>/, pruned to the newest k
    run.close()

What the recipe logs is its own business: `run.log` takes any keys (tensors are read only here,
so a loop that logs every k steps waits for the device every k steps) and adds `step`, `time`
and `peak_rss_mb`; a record with `num_tokens` also gets `tokens_per_second` and `step_time`,
measured from the start of the step. Rank 0 writes; other ranks keep their history silently.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from tunewright.training import distributed as dist
from tunewright.training.atomic import atomic_write_text
from tunewright.training.checkpointing import Export, LocalCheckpointer, resolve_resume
from tunewright.training.metrics import MetricsWriter, format_record, peak_rss_mb
from tunewright.training.progress import _Bar, progress_bar
from tunewright.training.state import TrainState


def save_config(cfg: Any, output_dir: Path) -> None:
    """The resolved config, for reproducibility (rank 0)."""
    if dist.is_main():
        from omegaconf import OmegaConf

        values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(values)))


def _plain(value: Any) -> Any:
    """A logged value as JSON takes it: tensors read (this is where the host waits for them)."""
    if torch.is_tensor(value):
        value = value.detach()
        return float(value) if value.is_floating_point() else int(value)
    return value


class Run:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        resume_from_checkpoint: bool | str = False,
        keep_last_n_checkpoints: int | None = 2,
        checkpointer: Any = None,
        metric_logger: Any = None,
        progress_bar: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        if dist.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = resume_from_checkpoint
        self.keep_last = keep_last_n_checkpoints
        # Local files by default; distributed runs pass a sharded one (same methods).
        self.checkpointer = checkpointer or LocalCheckpointer()
        self.metric_logger = metric_logger  # torchtune-style: log_dict(payload, step), close()
        self.show_bar = progress_bar
        self.step = 0
        self.total_steps: int | None = None
        self.history: list[dict[str, Any]] = []  # one merged record per logged step
        self._resumed_step: int | None = None
        self._writer: MetricsWriter | None = None
        self._bar: _Bar | None = None
        self._step_start: float | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, checkpointer: Any = None) -> "Run":
        """A run from the recipe config's `output_dir`, `resume_from_checkpoint`,
        `keep_last_n_checkpoints`, `metric_logger` and `progress_bar`; saves the config."""
        from tunewright.training.instantiate import instantiate

        run = cls(cfg.output_dir, resume_from_checkpoint=cfg.resume_from_checkpoint,
                  keep_last_n_checkpoints=cfg.keep_last_n_checkpoints, checkpointer=checkpointer,
                  metric_logger=instantiate(cfg.metric_logger, output_dir=cfg.output_dir),
                  progress_bar=cfg.progress_bar)
        save_config(cfg, run.output_dir)
        return run

    # ------------------------------------------------------------------ checkpoints
    def resume(self, state: TrainState) -> int:
        """Load the checkpoint `resume_from_checkpoint` names (auto: the latest, if any) into
        `state`; returns the step it was taken after (0: a fresh start)."""
        step_dir = resolve_resume(self.output_dir, self.resume_from)
        if step_dir is None:
            return 0
        saved = self.checkpointer.load(step_dir, state)
        self.step = self._resumed_step = int(saved["step"])
        if dist.is_main():
            print(f"resuming from step {self.step} of {step_dir}", flush=True)
        return self.step

    def save(self, state: TrainState, *, export: Export | None = None) -> Path | None:
        """Checkpoint `state` as step `self.step`; `export(dir)` adds files to it (e.g. an
        adapter users can take from this step)."""
        return self.checkpointer.save(self.output_dir, self.step, state, run_state={"step": self.step},
                                      export=export, keep_last=self.keep_last)

    # ------------------------------------------------------------------ steps
    def steps(self, total: int) -> Iterator[int]:
        """Step numbers from the one after the resumed step to `total`, with a progress bar;
        when they are done, a checkpoint still being written in the background is waited for."""
        self.total_steps = total
        self._metrics()  # a fresh run starts an empty metrics.jsonl; a resumed one cuts it
        self._bar = progress_bar(total=total, initial=self.step, enabled=dist.is_main(), show_bar=self.show_bar)
        try:
            while self.step < total:
                self.step += 1
                self._step_start = time.perf_counter()
                yield self.step
                self._bar.advance()
            self.checkpointer.wait()
        finally:
            self._bar.close()
            self._step_start = None

    def due(self, every: int | None, *, final: bool = False) -> bool:
        """Whether this step is a multiple of `every` (None/0: never), or, with `final`, the
        last step."""
        if final and self.total_steps is not None and self.step == self.total_steps and every:
            return True
        return bool(every) and self.step % every == 0

    # ------------------------------------------------------------------ metrics
    def log(self, **metrics: Any) -> dict[str, Any]:
        """Write one record of this step: stdout (and the bar), metrics.jsonl, the metric
        logger. Returns it."""
        record: dict[str, Any] = {"step": self.step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._step_start is not None and "num_tokens" in record:
            elapsed = time.perf_counter() - self._step_start
            record.update(tokens_per_second=record["num_tokens"] / max(elapsed, 1e-9), step_time=elapsed)
        record.update(time=time.time(), peak_rss_mb=round(peak_rss_mb(), 1))
        self._metrics().log(record)
        bar = self._bar or progress_bar(total=0, enabled=dist.is_main(), show_bar=False)
        bar.log(format_record(record))
        shown = {k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if isinstance(record.get(k), float)}
        if isinstance(record.get("tokens_per_second"), float) and math.isfinite(record["tokens_per_second"]):
            shown["tok_s"] = f"{record['tokens_per_second']:.0f}"
        bar.show(**shown)
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1].update(record)
        else:
            self.history.append(dict(record))
        return record

    def _metrics(self) -> MetricsWriter:
        if self._writer is None:
            self._writer = MetricsWriter(self.output_dir, resume_step=self._resumed_step, sink=self.metric_logger)
        return self._writer

    def close(self) -> None:
        """Close metrics.jsonl and the metric logger."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
