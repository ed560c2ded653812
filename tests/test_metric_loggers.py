"""Metric loggers, offline: each backend's own reader gives back what was logged (TensorBoard's
EventAccumulator, W&B's `wandb leet inspect --json` over the offline run's .wandb log, MLflow's
MlflowClient over the file store), and a tiny LoRA run's loggers hold metrics.jsonl's values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tunewright.training import metric_loggers as ml
from tunewright.training.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
WANDB_CLI = Path(sys.executable).parent / "wandb"

# Two records per step on step 2 (the step line, then the validation line), as recipes log.
RECORDS = [
    (1, {"loss": 2.5, "lr": 1e-3, "num_tokens": 64, "time": 1.8e9}),
    (2, {"loss": 2.25, "lr": 2e-3, "num_tokens": 60, "time": 1.8e9 + 1}),
    (2, {"val_loss": 2.375, "time": 1.8e9 + 2}),
    (3, {"loss": 2.125, "lr": 3e-3, "grad_norm": 0.5, "note": "text is not a metric", "time": 1.8e9 + 3}),
]


def expected(records=RECORDS) -> dict[str, dict[int, float]]:
    """key -> {step: value}, from the records as written above (numbers only, no time)."""
    out: dict[str, dict[int, float]] = {}
    for step, payload in records:
        for key, value in payload.items():
            if key not in ("time", "note"):
                out.setdefault(key, {})[step] = float(value)
    return out


def log_all(logger, records=RECORDS) -> None:
    for step, payload in records:
        logger.log_dict(payload, step=step)
    logger.close()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wb-cache", "WANDB_DATA_DIR": tmp_path / "wb-data"}.items():
        monkeypatch.setenv(name, str(value))


# ---------------------------------------------------------------------- readers
def read_tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_wandb(folder: Path) -> dict[str, dict[int, float]]:
    """The history records of the offline run under `folder`, through wandb's own reader."""
    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([str(WANDB_CLI), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    got: dict[str, dict[int, float]] = {}
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") != "history":
            continue
        item = record["history"]["item"]
        for key, value in item.items():
            if not key.startswith("_"):
                got.setdefault(key, {})[int(item["_step"])] = float(value)
    return got


def read_mlflow(store: Path, experiment: str = "tunewright") -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


# ---------------------------------------------------------------------- each logger
def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    log_all(ml.TensorBoardLogger(tmp_path))
    got = read_tensorboard(tmp_path / "tensorboard")
    want = expected()
    assert got.keys() == want.keys()
    for key in want:  # event files hold float32
        assert got[key] == pytest.approx(want[key], rel=1e-7), key


def test_tensorboard_resumed_run_shows_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    log_all(ml.TensorBoardLogger(tmp_path), [(s, {"loss": float(s)}) for s in range(1, 6)])
    # The process that resumes from the step-2 checkpoint re-runs steps 3-5 with new values.
    log_all(ml.TensorBoardLogger(tmp_path), [(s, {"loss": 10.0 + s}) for s in range(3, 7)])
    assert read_tensorboard(tmp_path / "tensorboard")["loss"] == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0, 5: 15.0, 6: 16.0}


def test_wandb_offline_run_reads_back(tmp_path, offline_wandb):
    log_all(ml.WandBLogger(tmp_path, project="test"))
    assert read_wandb(tmp_path) == expected()


def test_mlflow_file_store_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    log_all(ml.MLFlowLogger(tmp_path, experiment_name="exp"))
    assert read_mlflow(tmp_path / "mlruns", "exp") == expected()


def test_nan_reaches_the_backend_as_nan(tmp_path):
    pytest.importorskip("mlflow")
    log_all(ml.MLFlowLogger(tmp_path), [(1, {"loss": 1.0}), (2, {"loss": math.nan})])
    assert math.isnan(read_mlflow(tmp_path / "mlruns")["loss"][2])


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(ml, "is_main", lambda: False)
    log_all(ml.MultiLogger([ml.TensorBoardLogger(), ml.MLFlowLogger()], output_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_missing_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        ml.WandBLogger("out")
    assert str(e.value) == ("metric_logger WandBLogger needs wandb: pip install 'tunewright[wandb]' "
                            "(or remove metric_logger)")


def test_backend_that_cannot_start_fails_when_built(tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(ConfigError) as e:
        ml.MultiLogger([ml.MLFlowLogger(tracking_uri="nosuchscheme://host/x")], output_dir=tmp_path)
    message = str(e.value)
    assert message.startswith("metric_logger MLFlowLogger could not start: ") and "\n" not in message
    assert "nosuchscheme" in message


def test_bad_options_are_one_line():
    with pytest.raises(ConfigError, match="mode must be online, offline or disabled"):
        ml.WandBLogger("out", mode="ofline")
    with pytest.raises(ConfigError, match=r"loggers\[1\] is not a logger"):
        ml.MultiLogger([ml.StdoutLogger(), {"project": "x"}])


# ---------------------------------------------------------------------- through a recipe
def test_recipe_loggers_hold_metrics_jsonl(tmp_path, offline_wandb):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from tunewright.training.entry import run_recipe_file

    config = tmp_path / "tiny_lora_logged.yaml"
    config.write_text((REPO / "configs" / "llama" / "tiny_lora.yaml").read_text() + """
metric_logger:
  _component_: tunewright.training.metric_loggers.MultiLogger
  loggers:
    - _component_: tunewright.training.metric_loggers.TensorBoardLogger
    - _component_: tunewright.training.metric_loggers.WandBLogger
      project: tiny
    - _component_: tunewright.training.metric_loggers.MLFlowLogger
""")
    out = tmp_path / "run"
    run_recipe_file(REPO / "recipes" / "sft.py", config,
                    [f"output_dir={out}", "max_steps=3", "eval_every_n_steps=2", "max_eval_batches=1",
                     "batch_size=4", "progress_bar=false", "num_threads=1", "save_every_n_steps=null",
                     "save_final_model=false"])
    want: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                want.setdefault(key, {})[record["step"]] = float(value)
    assert {"loss", "val_loss", "lr", "tokens_per_second"} <= want.keys() and len(want["loss"]) == 3

    assert read_mlflow(out / "mlruns") == want
    assert read_wandb(out) == want
    tensorboard = read_tensorboard(out / "tensorboard")
    assert tensorboard.keys() == want.keys()
    for key in want:
        assert tensorboard[key] == pytest.approx(want[key], rel=1e-7), key
