"""The run object and the step batches (`training/run.py`, `training/batching.py`): what a
recipe's loop relies on, checked against what an uninterrupted loop or the written files say."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_scripts.two_models import Counter
from tunewright.data.sampler import ResumableSampler
from tunewright.training.batching import Batches, StepBatches
from tunewright.training.run import Run
from tunewright.training.state import TrainState


def batches(n: int, batch_size: int, *, shuffle: bool = True) -> Batches:
    rows = list(range(n))
    return Batches(rows, ResumableSampler(n, shuffle=shuffle, seed=4), batch_size, lambda b: {"rows": b})


def rows_of(micro_batches: list[dict]) -> list[list[int]]:
    return [b["rows"] for b in micro_batches]


def test_step_batches_count_and_cross_epochs():
    data = StepBatches(batches(10, 2, shuffle=False), gradient_accumulation_steps=2, epochs=2)
    assert (data.steps_per_epoch, data.total_steps) == (3, 6)  # 5 batches: 2 + 2 + 1 per epoch
    steps = [rows_of(data.next()) for _ in range(data.total_steps)]
    assert steps[:3] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]] and steps[3:] == steps[:3]
    with pytest.raises(RuntimeError, match="epochs are used up"):
        data.next()
    capped = StepBatches(batches(10, 2), gradient_accumulation_steps=2, epochs=3, max_steps_per_epoch=2, max_steps=5)
    assert (capped.steps_per_epoch, capped.total_steps) == (2, 5)


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 5])
def test_step_batches_resume_where_an_uninterrupted_run_is(stop):
    def make() -> StepBatches:
        return StepBatches(batches(11, 2), gradient_accumulation_steps=2, epochs=3, max_steps_per_epoch=2)

    straight = make()
    want = [rows_of(straight.next()) for _ in range(straight.total_steps)]
    first = make()
    got = [rows_of(first.next()) for _ in range(stop)]
    second = make()
    second.load_state_dict(first.state_dict())
    got += [rows_of(second.next()) for _ in range(second.total_steps - stop)]
    assert got == want
    assert want[0] != want[2]  # epochs are shuffled differently


@pytest.mark.parametrize("key, value", [("gradient_accumulation_steps", 0), ("epochs", -1), ("max_steps", 0),
                                        ("max_steps_per_epoch", -2)])
def test_step_batches_refuse_values_that_give_no_step(key, value):
    with pytest.raises(ValueError, match=f"{key} must be >= 1, got {value}"):
        StepBatches(batches(4, 2), **{key: value})


def test_log_takes_any_keys_to_stdout_metrics_and_history(tmp_path, capsys):
    run = Run(tmp_path, progress_bar=False)
    for step in run.steps(4):
        run.log(loss=torch.tensor(2.5 - step), lr=1e-3, my_metric=torch.tensor(step * 10), num_tokens=100)
        if run.due(2, final=True):
            run.log(val_loss=torch.tensor(0.5, dtype=torch.float64))
    run.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2, 3, 4, 4]
    assert lines[0]["my_metric"] == 10 and isinstance(lines[0]["my_metric"], int)
    assert lines[0]["loss"] == 1.5 and lines[0]["tokens_per_second"] > 0 and "time" in lines[0]
    assert lines[2] == {"step": 2, "val_loss": 0.5, "time": lines[2]["time"], "peak_rss_mb": lines[2]["peak_rss_mb"]}
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert out[0].startswith("step 1 | loss 1.5000 | lr 1.00e-03 | tokens_per_second") and "my_metric 10" in out[0]
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]  # one record per step, merged
    assert run.history[1]["val_loss"] == 0.5 and run.history[1]["loss"] == 0.5


def test_due_counts_steps_and_the_final_one(tmp_path):
    run = Run(tmp_path, progress_bar=False)
    seen = [(step, run.due(3), run.due(3, final=True), run.due(None, final=True)) for step in run.steps(7)]
    assert [s for s, every, _, _ in seen if every] == [3, 6]
    assert [s for s, _, final, _ in seen if final] == [3, 6, 7]
    assert not any(never for *_, never in seen)


def test_resume_continues_the_steps_and_the_metrics_file(tmp_path, capsys):
    first = Run(tmp_path, keep_last_n_checkpoints=2, progress_bar=False)
    counter = Counter()
    for step in first.steps(6):
        counter.seen += step
        first.log(loss=float(step))
        if first.due(2):
            first.save(TrainState(counter=counter))
        if step == 5:
            break  # a crash after step 5 was logged
    first.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    again, restored = Run(tmp_path, resume_from_checkpoint="auto", progress_bar=False), Counter()
    assert again.resume(TrainState(counter=restored)) == 4 and restored.seen == 1 + 2 + 3 + 4
    assert f"resuming from step 4 of {tmp_path / 'checkpoints' / 'step_000004'}" in capsys.readouterr().out
    assert list(again.steps(6)) == [5, 6]
    again.close()
    # the line of the crashed run's step 5 is gone: steps 5 and 6 are logged by the resumed run
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    with pytest.raises(ValueError, match="holds an earlier run"):  # no resume: runs never mix
        Run(tmp_path, progress_bar=False)
    fresh = Run(tmp_path, progress_bar=False, overwrite_output_dir=True)  # asked: a clean start
    assert fresh.resume(TrainState(counter=Counter())) == 0
    list(fresh.steps(1))
    assert (tmp_path / "metrics.jsonl").read_text() == ""
