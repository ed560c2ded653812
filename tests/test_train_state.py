"""One `TrainState` checkpoints whatever a recipe has: two models with two optimizers, a
scheduler, a data stream and a counter of the recipe's own resume bit-exactly, in one process
(whole tensors or DCP) and over two processes (FSDP2 + DCP).

Reference: the per-step losses of the same loop run without interruption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist_scripts.launch import ENV, assert_resumed_at, metric_lines, tail, torchrun
from tests.dist_scripts.two_models import Counter
from tunewright.training.checkpointing import LocalCheckpointer, step_dirs, weights_file
from tunewright.training.state import TrainState

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "two_models.py"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def records(out: Path) -> dict[int, tuple[float, float, int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["policy_loss"], r["value_loss"], r["seen"]) for r in rows}


def python(*args: object) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, tail(done.stdout + done.stderr)


@pytest.mark.parametrize("kind", [[], ["--sharded"]], ids=["whole-tensors", "dcp"])
def test_two_models_and_optimizers_resume_bit_exactly(tmp_path, kind):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    python("--out", straight, *kind)
    python("--out", resumed, "--stop-after", "5", *kind)  # checkpoints at steps 2 and 4
    before = metric_lines(resumed)
    python("--out", resumed, "--resume", "auto", *kind)
    assert_resumed_at(resumed, before, 4)
    want = records(straight)
    assert sorted(want) == list(range(1, 9)) and want[8][2] == 32  # 8 steps of 4 prompts
    assert records(resumed) == want  # every model, optimizer, schedule, RNG and counter restored
    assert len({v for v, _, _ in want.values()}) == 8  # the losses really move
    if not kind:
        names = {p.name for p in step_dirs(straight)[-1][1].iterdir()}
        assert {weights_file("policy"), weights_file("value"), "policy_opt.pt", "value_opt.pt",
                "train_state.pt"} <= names


@pytest.mark.slow
def test_two_sharded_models_resume_bit_exactly_over_two_processes(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(2, SCRIPT, ["--out", straight, "--sharded"])
    torchrun(2, SCRIPT, ["--out", resumed, "--sharded", "--stop-after", "3"])
    before = metric_lines(resumed)
    torchrun(2, SCRIPT, ["--out", resumed, "--sharded", "--resume", "auto"])
    assert_resumed_at(resumed, before, 2)
    assert records(resumed) == records(straight)


# ---------------------------------------------------------------- TrainState itself
def test_entries_are_told_apart_by_type_and_none_is_skipped():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model=model, optimizer=opt, lr_scheduler=None, counter=Counter())
    assert list(state.models) == ["model"] and list(state.optimizers) == ["optimizer"]
    assert list(state.objects) == ["counter"] and state.optimizer_owners() == {"optimizer": "model"}
    with pytest.raises(TypeError, match="'steps' .* has no state_dict"):
        TrainState(steps=3)


def test_an_optimizer_must_belong_to_one_model_of_the_state():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    both = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="optimizer 'opt' steps parameters of several models"):
        TrainState(a=a, b=b, opt=both).optimizer_owners()
    with pytest.raises(ValueError, match="optimizer 'opt' steps parameters of no model"):
        TrainState(a=a, opt=torch.optim.SGD(b.parameters(), lr=0.1)).optimizer_owners()


def test_a_checkpoint_without_an_entry_of_the_state_names_it(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = LocalCheckpointer().save(tmp_path, 1, TrainState(model=model, optimizer=opt), run_state={"step": 1})
    value = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="has no model 'value'"):
        LocalCheckpointer().load(path, TrainState(model=model, optimizer=opt, value=value))
    with pytest.raises(ValueError, match="has no 'counter'"):
        LocalCheckpointer().load(path, TrainState(model=model, optimizer=opt, counter=Counter()))
    assert LocalCheckpointer().load(path, TrainState(model=model, optimizer=opt)) == {"step": 1}
