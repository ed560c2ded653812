"""Where a run's metrics go besides stdout and `metrics.jsonl`: TensorBoard, Weights & Biases,
MLflow, or several at once, chosen in the config as torchtune does:

    metric_logger:
      _component_: tunewright.training.metric_loggers.TensorBoardLogger   # -> <output_dir>/tensorboard
    metric_logger:
      _component_: tunewright.training.metric_loggers.MultiLogger
      loggers:
        - _component_: tunewright.training.metric_loggers.WandBLogger
          project: my-project
          mode: offline                     # or WANDB_MODE=offline: no network needed
        - _component_: tunewright.training.metric_loggers.MLFlowLogger   # file:<output_dir>/mlruns

stdout and `metrics.jsonl` are always written (training/metrics.py), so `StdoutLogger` and
`DiskLogger` add nothing; they exist so a torchtune config's names carry over. torchtune's
`torchtune.training.metric_logging.X` is `tunewright.training.metric_loggers.X` for X in
StdoutLogger, DiskLogger, TensorBoardLogger, WandBLogger, MLFlowLogger (a config may only name
tunewright's path: configs are code).

Every logger takes `log_dict(payload, step)` and `close()` (training/run.py's sink). Only rank 0
writes. Each backend is an optional extra (`pip install tunewright[tensorboard|wandb|mlflow]`),
checked when the logger is built (one line if missing). W&B and MLflow start their run when the
run starts, so a missing login or a bad tracking URI is one line before training; TensorBoard
opens at the first record, with its step, so a resumed run's events purge the steps it re-runs.
The logged values are the record's numbers (its `time` is left to the backend's own clock; NaN
stays NaN). A resumed run is a new W&B / MLflow run.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from tunewright.training.distributed import is_main
from tunewright.training.errors import ConfigError


def scalars(payload: dict[str, Any]) -> dict[str, float]:
    """The numbers of one record, as floats; `time` (unix time) is not a metric."""
    return {k: float(v) for k, v in payload.items()
            if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Backend:
    """A logger whose backend opens on rank 0 once the run's directory is known (a missing login
    or a bad tracking URI fails before training), or, with `opens_at_first_record`, at the first
    record (TensorBoard needs its step). Subclasses set their options before `super().__init__`."""

    module = ""  # the package it needs
    extra = ""  # the pyproject extra that installs it
    opens_at_first_record = False

    def __init__(self, output_dir: str | Path | None = None) -> None:
        if importlib.util.find_spec(self.module) is None:
            raise ConfigError(f"metric_logger {type(self).__name__} needs {self.module}: "
                              f"pip install 'tunewright[{self.extra}]' (or remove metric_logger)")
        self.output_dir: Path | None = None
        self.enabled = is_main()
        self._opened = False
        if output_dir is not None:
            self.bind(output_dir)

    def bind(self, output_dir: str | Path) -> None:
        """The run's directory (MultiLogger gives it to the loggers built inside it)."""
        if self.output_dir is None:
            self.output_dir = Path(output_dir)
        if not self.opens_at_first_record:
            self._ensure_open(None)

    def _ensure_open(self, first_step: int | None) -> None:
        if self._opened or not self.enabled:
            return
        if self.output_dir is None:
            raise ConfigError(f"metric_logger {type(self).__name__} has no output_dir")
        try:
            self._open(first_step)
        except Exception as e:  # the backend's own error (login, URI, ...): one line with its reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"metric_logger {type(self).__name__} could not start: {reason}") from e
        self._opened = True

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self._ensure_open(step)
        self._write(scalars(payload), step)

    def close(self) -> None:
        if self._opened:
            self._close()
            self._opened = False

    def _open(self, first_step: int | None) -> None:
        raise NotImplementedError

    def _write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardLogger(_Backend):
    """Event files in `log_dir` (default `<output_dir>/tensorboard`): `tensorboard --logdir ...`."""

    module, extra = "tensorboard", "tensorboard"
    opens_at_first_record = True

    def __init__(self, output_dir: str | Path | None = None, *, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        super().__init__(output_dir)

    def _open(self, first_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        assert self.output_dir is not None
        log_dir = Path(self.log_dir) if self.log_dir else self.output_dir / "tensorboard"
        # purge_step: TensorBoard hides events an earlier process logged from this step on, so a
        # resumed run's re-run steps appear once.
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step if first_step and first_step > 1 else None)

    def _write(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # a record every log_every_n_steps: visible at once, cheap

    def _close(self) -> None:
        self._writer.close()


class WandBLogger(_Backend):
    """A Weights & Biases run with its files under `log_dir` (default `output_dir`). `mode`:
    online, offline (no network; `wandb sync` uploads later) or disabled; None follows
    WANDB_MODE. Other keyword arguments go to `wandb.init` (entity, group, name, tags, ...)."""

    module, extra = "wandb", "wandb"

    def __init__(self, output_dir: str | Path | None = None, *, project: str = "tunewright",
                 mode: str | None = None, log_dir: str | None = None, **init_kwargs: Any) -> None:
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"metric_logger.mode must be online, offline or disabled, got {mode!r}")
        self.project, self.mode, self.log_dir, self.init_kwargs = project, mode, log_dir, init_kwargs
        super().__init__(output_dir)

    def _open(self, first_step: int | None) -> None:
        import wandb

        assert self.output_dir is not None
        folder = Path(self.log_dir) if self.log_dir else self.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=self.project, dir=str(folder), mode=self.mode, **self.init_kwargs)

    def _write(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def _close(self) -> None:
        self._run.finish()


class MLFlowLogger(_Backend):
    """An MLflow run in experiment `experiment_name` at `tracking_uri` (default: a local file
    store, `file:<output_dir>/mlruns`; `mlflow ui --backend-store-uri ...` shows it)."""

    module, extra = "mlflow", "mlflow"

    def __init__(self, output_dir: str | Path | None = None, *, experiment_name: str = "tunewright",
                 tracking_uri: str | None = None, run_name: str | None = None) -> None:
        self.experiment_name, self.tracking_uri, self.run_name = experiment_name, tracking_uri, run_name
        super().__init__(output_dir)

    def _open(self, first_step: int | None) -> None:
        from mlflow.tracking import MlflowClient

        assert self.output_dir is not None
        uri = self.tracking_uri or (self.output_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked (it prefers a database); a local
            # directory is what this logger promises without a server or SQL packages.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment_name)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def _write(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _close(self) -> None:
        self._client.set_terminated(self.run_id)


class MultiLogger:
    """Several loggers at once: `loggers` is a list of logger components."""

    def __init__(self, loggers: list[Any], output_dir: str | Path | None = None) -> None:
        if not loggers:
            raise ConfigError("metric_logger.loggers is empty; list loggers or set metric_logger: null")
        bad = [i for i, lg in enumerate(loggers) if not callable(getattr(lg, "log_dict", None))]
        if bad:
            raise ConfigError(f"metric_logger.loggers[{bad[0]}] is not a logger (a mapping with "
                              "_component_: tunewright.training.metric_loggers.<Name>)")
        self.loggers = loggers
        if output_dir is not None:
            for logger in loggers:
                if hasattr(logger, "bind"):
                    logger.bind(output_dir)

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(payload, step)

    def close(self) -> None:
        for logger in self.loggers:
            if hasattr(logger, "close"):
                logger.close()


class StdoutLogger:
    """torchtune's name for what every run does anyway (training/metrics.py): nothing extra."""

    def __init__(self, output_dir: str | Path | None = None) -> None:
        pass

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class DiskLogger(StdoutLogger):
    """torchtune's name for a log file: `<output_dir>/metrics.jsonl` is always written."""

    def __init__(self, output_dir: str | Path | None = None, log_dir: str | None = None) -> None:
        pass

