"""The run: its output directory, step counter, resume, metrics, progress and checkpoints.

    run = Run.from_config(cfg)                    # locks output_dir, saves config.yaml
    run.resume(state)                             # a TrainState: loads the checkpoint asked for
    for step in run.steps(total_steps):           # from the resumed step on; progress bar, ETA
        ...                                       # the recipe's own step
        optimizer_step(optimizer, loss=loss_sum, run=run, ...)  # NaN/inf: run.nonfinite decides
        if run.due(cfg.log_every_n_steps, first=True, final=True):
            run.log(loss=loss, lr=lr, my_metric=x)    # any keys: stdout, metrics.jsonl, logger
        if run.due(cfg.save_every_n_steps):
            run.save(state, export=write_adapter)  # atomic step_<N>/, pruned to the newest k
    run.close()

What the recipe logs is its own business: `run.log` takes any keys (tensors are read only here,
so a loop that logs every k steps waits for the device every k steps) and adds `step`, `time`
and `peak_rss_mb`; a record with `num_tokens` also gets `tokens_per_second` and `step_time`,
measured from the start of the step, and `mfu` (training/mfu.py: the FLOPs of the models given
to `resume`, over the device's peak). Rank 0 writes; other ranks keep their history silently.

The output directory holds one run (`training/run_dir.py`): a lock keeps a second one out, the
temporaries of a killed run are cleared, an earlier run is continued (resume), refused, or
deleted first (`overwrite_output_dir`). A resumed run's config is compared with its
checkpoint's (`training/resume_config.py`), and `auto` falls back past a damaged checkpoint.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from tunewright.training import distributed as dist
from tunewright.training.atomic import atomic_write_text
from tunewright.training.checkpointing import (STATE_FILE, Export, LocalCheckpointer, resume_candidates,
                                               wants_resume)
from tunewright.training.errors import ConfigError
from tunewright.training.metrics import MetricsWriter, format_record, peak_rss_mb
from tunewright.training.mfu import MFU
from tunewright.training.nonfinite import NonFiniteError, check_finite_parameters, describe
from tunewright.training.progress import _Bar, progress_bar
from tunewright.training.resume_config import check_config_change, fingerprint
from tunewright.training.run_dir import CONFIG_FILE, on_rank0, prepare_output_dir
from tunewright.training.state import TrainState


def save_config(cfg: Any, output_dir: Path) -> None:
    """The resolved config, for reproducibility (rank 0)."""
    if dist.is_main():
        from omegaconf import OmegaConf

        from tunewright.training.config import as_written

        # Values from environment variables (tokens) stay `${oc.env:NAME}`, never in clear.
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(as_written(cfg))))


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
        overwrite_output_dir: bool = False,
        checkpointer: Any = None,
        metric_logger: Any = None,
        progress_bar: bool = True,
        on_nonfinite: str = "stop",
        max_nonfinite_steps: int = 10,
        config: Any = None,
        name: str = "run",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.resume_from = resume_from_checkpoint
        if overwrite_output_dir and wants_resume(resume_from_checkpoint):
            raise ConfigError("overwrite_output_dir=true deletes the earlier run that "
                             f"resume_from_checkpoint={resume_from_checkpoint} would continue; set one")
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        if max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.keep_last = keep_last_n_checkpoints
        # Local files by default; distributed runs pass a sharded one (same methods).
        self.checkpointer = checkpointer or LocalCheckpointer()
        self.metric_logger = metric_logger  # torchtune-style: log_dict(payload, step), close()
        self.show_bar = progress_bar
        self.on_nonfinite, self.max_nonfinite_steps = on_nonfinite, max_nonfinite_steps
        self.nonfinite_skipped = 0
        self.config = config  # its fingerprint goes into each checkpoint; compared on resume
        self.name = name
        self.step = 0
        self.total_steps: int | None = None
        self.history: list[dict[str, Any]] = []  # one merged record per logged step
        self._resumed_step: int | None = None
        self._first_step: int | None = None
        self._last_saved: int | None = None
        self._writer: MetricsWriter | None = None
        self._bar: _Bar | None = None
        self._step_start: float | None = None
        self._mfu: MFU | None = None  # from the models resume() is given
        self._lock: Any = None

        def prepare() -> tuple[list[Path], list[str]]:
            lock, notes = prepare_output_dir(self.output_dir, resuming=wants_resume(resume_from_checkpoint),
                                             overwrite=overwrite_output_dir)
            try:
                candidates, more = resume_candidates(self.output_dir, resume_from_checkpoint)
            except BaseException:
                lock.release()
                raise
            self._lock = lock
            return candidates, notes + more

        # Rank 0 decides, every rank learns the outcome (an error stops them all).
        self._candidates, notes = on_rank0(prepare)
        # Released by close(), or when this object goes (a run abandoned after an error).
        self._release = weakref.finalize(self, self._lock.release) if self._lock is not None else None
        self._say(*notes)
        try:
            if self._candidates and config is not None:
                self._check_config(self._candidates[0])
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: Any, *, checkpointer: Any = None, announce: bool = True) -> "Run":
        """A run from the recipe config's `output_dir`, `resume_from_checkpoint`,
        `overwrite_output_dir`, `keep_last_n_checkpoints`, `metric_logger`, `progress_bar`,
        `on_nonfinite` and `max_nonfinite_steps`; saves the config. `announce=False`: the
        recipe prints the memory estimate itself, once it knows more (its prompts' lengths,
        `estimate.announce_for_prompts`)."""
        from tunewright.training.instantiate import instantiate

        if getattr(cfg, "on_nonfinite", "stop") == "skip" and getattr(cfg, "optimizer_in_backward", False):
            raise ConfigError("on_nonfinite: skip needs optimizer_in_backward: false (with it, each weight has "
                             "stepped before the step's loss is known); use on_nonfinite: stop")
        run = cls(cfg.output_dir, resume_from_checkpoint=cfg.resume_from_checkpoint,
                  keep_last_n_checkpoints=cfg.keep_last_n_checkpoints,
                  overwrite_output_dir=getattr(cfg, "overwrite_output_dir", False), checkpointer=checkpointer,
                  progress_bar=cfg.progress_bar, on_nonfinite=getattr(cfg, "on_nonfinite", "stop"),
                  max_nonfinite_steps=getattr(cfg, "max_nonfinite_steps", 10), config=cfg,
                  name=f"{cfg.recipe} on {getattr(cfg, 'device', 'cpu')}")
        # After the directory is ours: a logger may write files into it.
        run.metric_logger = instantiate(cfg.metric_logger, output_dir=cfg.output_dir)
        save_config(cfg, run.output_dir)
        if announce:
            from tunewright.training.estimate import announce as announce_estimate

            announce_estimate(cfg)  # the memory the run needs, term by term, before any weight loads (rank 0)
        return run

    def _say(self, *lines: str) -> None:
        if dist.is_main():
            for line in lines:
                print(line, flush=True)

    def _check_config(self, step_dir: Path) -> None:
        """Refuse a config change that cannot apply to a run resumed from `step_dir`."""
        saved = torch.load(step_dir / STATE_FILE, weights_only=True)["run"]
        applied = check_config_change(saved.get("config"), self.config, step_dir=step_dir,
                                      saved_config=step_dir / CONFIG_FILE,
                                      data_parallel=(saved.get("data_parallel", 1), dist.data_world_size()))
        if applied:
            self._say(applied)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, state: TrainState) -> int:
        """Load the checkpoint `resume_from_checkpoint` names (auto: the latest complete one, if
        any) into `state`; returns the step it was taken after (0: a fresh start). One process
        falls back to the checkpoint before a latest one that fails to load."""
        if dist.is_main() and state.models:  # the state's models give the FLOPs a token costs
            self._mfu = MFU(state.models.values(), dtype=getattr(self.config, "dtype", "fp32"),
                            tf32=getattr(self.config, "tf32", True))
            self._say(self._mfu.describe())
        saved, errors = None, []
        for step_dir in self._candidates:
            if errors and self.config is not None:
                self._check_config(step_dir)
            try:
                saved = self.checkpointer.load(step_dir, state)
                break
            except (ValueError, OSError, RuntimeError) as e:
                if dist.is_distributed() or step_dir == self._candidates[-1]:
                    raise (errors[0][1] if errors else e) from None
                errors.append((step_dir, e))
        if saved is None:
            return 0
        for bad, e in errors:  # one process: the directory is ours to set aside
            aside = bad.with_name(f"{bad.name}.damaged")
            os.rename(bad, aside)
            self._say(f"resume_from_checkpoint: {bad.name} failed to load ({str(e).splitlines()[0]}); set "
                      f"aside as {aside.name}, falling back to {step_dir.name}")
        self.step = self._resumed_step = int(saved["step"])
        self.nonfinite_skipped = int(saved.get("nonfinite_skipped", 0))
        self._last_saved = self.step
        self._say(f"resuming from step {self.step} of {step_dir}")
        return self.step

    def save(self, state: TrainState, *, export: Export | None = None) -> Path | None:
        """Checkpoint `state` as step `self.step`; `export(dir)` adds files to it (e.g. an
        adapter users can take from this step). Weights holding NaN or infinity are never
        written (the run stops instead)."""
        check_finite_parameters(state.models.values(), f"checkpoint of step {self.step}")
        run_state = {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped,
                     "data_parallel": dist.data_world_size()}
        if self.config is not None:
            run_state["config"] = fingerprint(self.config, data_parallel=dist.data_world_size())

        def files(directory: Path) -> None:
            if self.config is not None:  # the values behind the fingerprint, for a resume's message
                save_config(self.config, directory)
            if export is not None:
                export(directory)

        path = self.checkpointer.save(self.output_dir, self.step, state, run_state=run_state,
                                      export=files, keep_last=self.keep_last)
        self._last_saved = self.step
        return path

    def nonfinite(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> None:
        """A step's loss or gradient norm is NaN or infinite (on some rank): with `on_nonfinite:
        stop`, or past `max_nonfinite_steps` skipped steps, raise `NonFiniteError`; with `skip`,
        count and log it, and return (the caller skips the update)."""
        values = f"loss {describe(loss)}, grad_norm {describe(grad_norm)} on rank {dist.rank()}"
        kept = (f"checkpoints up to step {self._last_saved} are kept" if self._last_saved
                else "no checkpoint was saved")
        clipped = getattr(self.config, "clip_grad_norm", None) is not None
        fix = "lower optimizer.lr" + ("" if clipped else ", set clip_grad_norm")
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"step {self.step}: non-finite loss or gradient ({values}); stopped before "
                                 f"the update: {kept}, nothing exported; {fix}, or skip such steps with "
                                 "on_nonfinite=skip")
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > self.max_nonfinite_steps:
            raise NonFiniteError(f"step {self.step}: {self.nonfinite_skipped} steps with a non-finite loss or "
                                 f"gradient, more than max_nonfinite_steps={self.max_nonfinite_steps} ({values}); "
                                 f"stopped: {kept}, nothing exported; {fix}")
        self.log(skipped_nonfinite=self.nonfinite_skipped)

    # ------------------------------------------------------------------ steps
    def steps(self, total: int) -> Iterator[int]:
        """Step numbers from the one after the resumed step to `total`, with a progress bar;
        when they are done, a checkpoint still being written in the background is waited for."""
        self.total_steps = total
        self._first_step = self.step + 1
        self._metrics()  # a fresh run starts an empty metrics.jsonl; a resumed one cuts it
        left = f"steps {self.step + 1}-{total} of {total}" if self.step else f"{total} steps"
        self._say(f"{self.name}: {left}, writing to {self.output_dir}")
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

    def due(self, every: int | None, *, first: bool = False, final: bool = False) -> bool:
        """Whether this step is a multiple of `every` (None/0: never), or, with `first`, the
        first step this process runs (so a log shows up at once, not after `every` steps), or,
        with `final`, the last step."""
        if not every:
            return False
        if first and self.step == self._first_step:
            return True
        if final and self.total_steps is not None and self.step == self.total_steps:
            return True
        return self.step % every == 0

    # ------------------------------------------------------------------ metrics
    def log(self, **metrics: Any) -> dict[str, Any]:
        """Write one record of this step: stdout (and the bar), metrics.jsonl, the metric
        logger. Returns it."""
        record: dict[str, Any] = {"step": self.step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._step_start is not None and "num_tokens" in record:
            elapsed = time.perf_counter() - self._step_start
            record.update(tokens_per_second=record["num_tokens"] / max(elapsed, 1e-9), step_time=elapsed)
            record.update(self._mfu.record(record["tokens_per_second"]) if self._mfu else {})
        record.update(time=time.time(), peak_rss_mb=round(peak_rss_mb(), 1))
        self._metrics().log(record)
        bar = self._bar or progress_bar(total=0, enabled=dist.is_main(), show_bar=False)
        bar.log(format_record(record))
        shown = {k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if isinstance(record.get(k), float)}
        if isinstance(record.get("tokens_per_second"), float) and math.isfinite(record["tokens_per_second"]):
            shown["tok_s"] = f"{record['tokens_per_second']:.0f}"
        if isinstance(record.get("mfu"), float):
            shown["mfu"] = f"{100 * record['mfu']:.1f}%"
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
        """Close metrics.jsonl and the metric logger; release the output directory."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._release is not None:
            self._release()
