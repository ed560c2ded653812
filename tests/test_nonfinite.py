"""Non-finite values stop the run (or skip its update) and are never saved: the recipe end to
end, `optimizer_step` on its own, the agreement of two processes, and metrics.jsonl as strict
JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunewright.training import objectives
from tunewright.training.entry import run_recipe_file
from tunewright.training.metrics import MetricsWriter
from tunewright.training.nonfinite import NonFiniteError
from tunewright.training.optim import optimizer_step
from tunewright.training.run import Run
from tunewright.training.state import TrainState

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft.py"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null"]


def strict_lines(path: Path) -> list[dict]:
    """metrics.jsonl read by a parser that refuses NaN and Infinity (as JSON does)."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def finite_file(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_diverging_run_stops_keeps_its_finite_checkpoints_and_exports_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss .* checkpoints up to step 2 are kept"):
        run_recipe_file(RECIPE, REPO / "configs/llama/tiny_full.yaml",
                        [f"output_dir={out}", *FAST, "max_steps=8", "optimizer.lr=1e10", "save_every_n_steps=1",
                         "keep_last_n_checkpoints=2"])
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_000001", "step_000002"]  # pruning never ran past the last finite one
    for step in steps:
        assert finite_file(out / "checkpoints" / step / "model.trainable.safetensors")
    assert not (out / "final").exists()
    assert [r["step"] for r in strict_lines(out / "metrics.jsonl")] == [1, 2]


def _nan_at_call(monkeypatch, n: int) -> None:
    """The recipe's n-th loss computation returns NaN (a transient fault: one bad batch)."""
    real, calls = objectives.causal_lm_loss, [0]

    def loss_fn(*args, **kwargs):
        calls[0] += 1
        loss, count = real(*args, **kwargs)
        return (loss * float("nan") if calls[0] == n else loss), count

    monkeypatch.setattr(objectives, "causal_lm_loss", loss_fn)


def test_skip_drops_that_steps_update_and_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at_call(monkeypatch, 3)  # one micro-batch per step: step 3
    history = run_recipe_file(RECIPE, REPO / "configs/llama/tiny_lora.yaml",
                              [f"output_dir={out}", *FAST, "max_steps=6", "on_nonfinite=skip",
                               "save_every_n_steps=6", "save_final_model=false"])
    lines = strict_lines(out / "metrics.jsonl")
    assert [r["step"] for r in lines if "skipped_nonfinite" in r] == [3]
    assert next(r for r in lines if r["step"] == 3 and "loss" in r)["loss"] is None  # NaN -> null
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # AdamW counts the updates it made: 6 steps, one skipped.
    optimizer = torch.load(out / "checkpoints/step_000006/optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {5.0}
    assert finite_file(out / "adapter" / "adapter_model.safetensors")


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("clip", [1.0, None])
@pytest.mark.parametrize("bad", ["loss", "grad", "inf_loss"])
def test_optimizer_step_catches_a_nonfinite_loss_or_gradient_before_updating(bad, clip):
    model, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 4)).sum()
    loss.backward()
    if bad == "grad":
        model.weight.grad[0, 0] = float("nan")  # a finite loss, an overflowed gradient
    value = {"loss": torch.tensor(float("nan")), "inf_loss": torch.tensor(float("inf"))}.get(bad, loss.detach())
    with pytest.raises(NonFiniteError, match="stopped before the update"):
        optimizer_step(optimizer, clip_grad_norm=clip, loss=value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_optimizer_step_skips_with_a_run_that_says_skip(tmp_path):
    model, optimizer = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    run = Run(tmp_path, progress_bar=False, on_nonfinite="skip", max_nonfinite_steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    for step in run.steps(2):
        model(torch.ones(2, 4)).sum().backward()
        if step == 1:
            _, lr = optimizer_step(optimizer, lr_scheduler=scheduler, loss=torch.tensor(float("nan")), run=run)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
            assert model.weight.grad is None  # and its gradients are gone
        else:
            _, lr = optimizer_step(optimizer, lr_scheduler=scheduler, loss=torch.tensor(1.0), run=run)
            assert lr == pytest.approx(0.05)  # the schedule moved on through the skipped step
    run.close()
    assert run.nonfinite_skipped == 1 and not torch.equal(before[0], model.weight)


def test_a_checkpoint_of_nonfinite_weights_is_refused_and_the_previous_kept(tmp_path):
    model, _ = _model_and_optimizer()
    run = Run(tmp_path, progress_bar=False, keep_last_n_checkpoints=1)
    state = TrainState(model=model)
    for step in run.steps(2):
        if step == 2:
            with torch.no_grad():
                model.weight[0, 0] = float("inf")  # an update of finite gradients overflowed
            with pytest.raises(NonFiniteError, match="checkpoint of step 2: not written"):
                run.save(state)
        else:
            run.save(state)
    run.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


def test_metrics_jsonl_stays_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "nested": [float("-inf"), 1.5]})
    writer.close()
    assert strict_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None,
                                                         "nested": [None, 1.5]}]


def _two_ranks(rank: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, optimizer = _model_and_optimizer()
        model(torch.ones(2, 4)).sum().backward()
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)  # only rank 1 sees it
        try:
            optimizer_step(optimizer, clip_grad_norm=None, loss=loss)
            results[rank] = "stepped"
        except NonFiniteError:
            results[rank] = "stopped"
    finally:
        tdist.destroy_process_group()


def test_every_rank_stops_when_one_rank_sees_nan():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_ranks, args=(port, results), nprocs=2)
        assert dict(results) == {0: "stopped", 1: "stopped"}
