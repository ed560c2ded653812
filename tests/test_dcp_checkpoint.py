"""Sharded checkpoints (training/dcp_checkpoint.py) and the sampler position across world sizes.

References: an uninterrupted run's per-step losses (fp32, FSDP2 over gloo, tolerance 1e-5
relative, since 1 and 2 processes sum in different orders), the uninterrupted sampler order of
the new world size, and the state a checkpoint was taken of.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist_scripts.launch import assert_resumed_at, losses, metric_lines, torchrun
from tunewright.data.sampler import ResumableSampler
from tunewright.training import dcp_checkpoint
from tunewright.training.checkpointing import LocalCheckpointer, resolve_resume, step_dirs
from tunewright.training.dcp_checkpoint import ShardedCheckpointer, derived_seed
from tunewright.training.state import TrainState

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "dcp_train.py"
# DCP says it assumes one process each time it saves without a process group: here we mean it.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ---------------------------------------------------------------- sampler across world sizes
def shards(num_samples: int, world_size: int, epoch: int = 0, **kw) -> list[list[int]]:
    out = []
    for rank in range(world_size):
        sampler = ResumableSampler(num_samples, seed=7, rank=rank, world_size=world_size, **kw)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def grouped(world_size: int, batch_size: int) -> dict:
    lengths = torch.randint(1, 90, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    return dict(group_by_length=True, lengths=lengths, batch_size=batch_size, megabatch_batches=2)


@pytest.mark.parametrize("num_samples", [24, 23])
@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("kind", ["shuffled", "grouped"])
def test_two_ranks_at_index_n_resume_as_one_rank_at_2n_and_back(num_samples, n, kind):
    # Equal global batch (2 x 2 = 1 x 4), which also keeps length grouping's megabatches equal.
    kw2 = grouped(2, 2) if kind == "grouped" else {}
    kw1 = grouped(1, 4) if kind == "grouped" else {}
    if kind == "grouped":
        num_samples = 23
    one = shards(num_samples, 1, **kw1)[0]
    two = shards(num_samples, 2, **kw2)
    # 2 -> 1: both ranks took n indices; one rank continues where the single-rank run is at 2n.
    states = []
    for rank in range(2):
        sampler = ResumableSampler(num_samples, seed=7, rank=rank, world_size=2, **kw2)
        taken = list(itertools.islice(iter(sampler), n))
        assert taken == two[rank][:n]
        states.append(sampler.state_dict())
    assert states[0] == states[1]
    resumed = ResumableSampler(num_samples, seed=7, **kw1)
    resumed.load_state_dict(states[0])
    assert resumed.state_dict()["index"] == 2 * n
    assert list(resumed) == one[2 * n :]
    # 1 -> 2: one rank took 2n; rank r continues where the two-rank run is at n.
    single = ResumableSampler(num_samples, seed=7, **kw1)
    list(itertools.islice(iter(single), 2 * n))
    for rank in range(2):
        sampler = ResumableSampler(num_samples, seed=7, rank=rank, world_size=2, **kw2)
        sampler.load_state_dict(single.state_dict())
        assert sampler.state_dict()["index"] == n
        assert list(sampler) == two[rank][n:]


def test_conversions_that_are_not_exact_fail_in_one_line():
    single = ResumableSampler(20, seed=1)
    list(itertools.islice(iter(single), 3))  # 3 samples: two ranks cannot split them evenly
    with pytest.raises(ValueError, match="cannot continue exactly") as error:
        ResumableSampler(20, seed=1, rank=0, world_size=2).load_state_dict(single.state_dict())
    assert "\n" not in str(error.value)
    # length grouping's order depends on batch_size x world_size: 2 x 2 saved, 1 x 2 resumes
    two = ResumableSampler(23, seed=7, rank=0, world_size=2, **grouped(2, 2))
    list(itertools.islice(iter(two), 2))
    with pytest.raises(ValueError, match="same batch_size x world_size"):
        ResumableSampler(23, seed=7, **grouped(1, 2)).load_state_dict(two.state_dict())


def test_a_position_past_the_new_world_sizes_epoch_moves_to_the_next_epoch():
    # drop_last: 1 rank reads all 23 samples, 3 ranks only 21; after 21 their epoch is over.
    single = ResumableSampler(23, seed=2, drop_last=True)
    list(itertools.islice(iter(single), 21))
    state = single.state_dict()
    three = [ResumableSampler(23, seed=2, rank=r, world_size=3, drop_last=True) for r in range(3)]
    for sampler in three:
        sampler.load_state_dict(state)
        assert list(sampler) == [] and sampler.state_dict()["epoch"] == 1


# ---------------------------------------------------------------- one process, no process group
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)
        self.base.requires_grad_(False)  # as a LoRA base: not in the checkpoint
        self.adapter = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x) + self.adapter(x)))


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Small()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, optimizer


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        # the data comes from the global RNG, so an exact resume must restore it too
        loss = (model(torch.randn(4, 6)) - torch.randn(4, 2)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def save(checkpointer, out: Path, step: int, model, optimizer, **kw) -> Path | None:
    return checkpointer.save(str(out), step, TrainState(model=model, optimizer=optimizer),
                             run_state={"step": step, "epoch": 0}, **kw)


def load(checkpointer, path: Path, model, optimizer) -> dict:
    return checkpointer.load(path, TrainState(model=model, optimizer=optimizer))


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_in_one_process_continues_bit_identically(tmp_path, async_save):
    model, optimizer = make()
    train(model, optimizer, 3)
    checkpointer = ShardedCheckpointer(async_save=async_save)
    path = save(checkpointer, tmp_path, 3, model, optimizer)
    expected = train(model, optimizer, 3)  # steps the checkpoint was not there for
    checkpointer.wait()

    other, other_opt = make(seed=1)  # different trainable weights, the same frozen base below
    other.base.load_state_dict(model.base.state_dict())
    torch.manual_seed(123)
    random.seed(123)
    state = load(ShardedCheckpointer(), path, other, other_opt)
    assert state == {"step": 3, "epoch": 0}
    assert train(other, other_opt, 3) == expected


def test_only_trainable_weights_are_saved_and_the_keys_must_match(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    model, optimizer = make()
    train(model, optimizer, 1)
    path = save(ShardedCheckpointer(), tmp_path, 1, model, optimizer)
    keys = FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    assert {k for k in keys if k.startswith("model.model.")} == {
        "model.model.adapter.weight", "model.model.adapter.bias", "model.model.head.weight",
        "model.model.head.bias"}
    model.head.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="does not match model 'model''s trainable parameters"):
        load(ShardedCheckpointer(), path, model, optimizer)


def test_layout_atomic_rename_prune_and_resume_lookup(tmp_path):
    model, optimizer = make()
    train(model, optimizer, 1)
    checkpointer = ShardedCheckpointer()
    exported = []

    def export(directory: Path) -> None:
        from safetensors.torch import save_file

        exported.append(directory)
        save_file({"x": torch.zeros(1)}, str(directory / "adapter_model.safetensors"))

    for step in (1, 2, 3):
        save(checkpointer, tmp_path, step, model, optimizer, export=export, keep_last=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 3]
    final = tmp_path / "checkpoints" / "step_000003"
    assert exported[-1].name == ".step_000003.tmp"  # export writes into the not-yet-visible dir
    assert {p.name for p in final.iterdir()} == {"dcp", "rng", "train_state.pt",
                                                 "adapter_model.safetensors"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert resolve_resume(tmp_path, "auto") == final
    assert resolve_resume(tmp_path, str(final)) == final

    # A run killed while saving step 4 left its temporary directory: resume ignores it, and the
    # next save of step 4 starts it afresh.
    stale = tmp_path / "checkpoints" / ".step_000004.tmp"
    (stale / "dcp").mkdir(parents=True)
    (stale / "dcp" / "__1_0.distcp").write_text("half written")
    assert resolve_resume(tmp_path, "auto") == final
    save(checkpointer, tmp_path, 4, model, optimizer, keep_last=2)
    assert not stale.exists()
    assert not (tmp_path / "checkpoints" / "step_000004" / "dcp" / "__1_0.distcp").exists()


def test_the_two_checkpoint_kinds_refuse_each_other_clearly(tmp_path):
    model, optimizer = make()
    train(model, optimizer, 1)
    sharded = save(ShardedCheckpointer(), tmp_path / "a", 1, model, optimizer)
    local = save(LocalCheckpointer(), tmp_path / "b", 1, model, optimizer)
    with pytest.raises(ValueError, match="sharded checkpoint of a distributed run"):
        load(LocalCheckpointer(), sharded, model, optimizer)
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load(ShardedCheckpointer(), local, model, optimizer)


def test_async_save_keeps_the_state_of_the_moment_it_was_called(tmp_path):
    model, optimizer = make()
    train(model, optimizer, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    checkpointer = ShardedCheckpointer(async_save=True)
    path = save(checkpointer, tmp_path, 2, model, optimizer)
    with torch.no_grad():  # training goes on while the checkpoint is written
        for p in model.parameters():
            p.add_(1.0)
        for s in optimizer.state.values():
            s["exp_avg"].add_(1.0)
    checkpointer.wait()
    other, other_opt = make(seed=1)
    load(ShardedCheckpointer(), path, other, other_opt)
    for name in ("adapter.weight", "head.bias"):
        assert torch.equal(other.state_dict()[name], weights[name])
    for k, v in other_opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments[k])


def test_a_rank_the_saving_run_did_not_have_gets_a_derived_rng(tmp_path, monkeypatch):
    model, optimizer = make()
    train(model, optimizer, 1)
    path = save(ShardedCheckpointer(), tmp_path, 5, model, optimizer)  # world size 1, seed 0
    monkeypatch.setattr(dcp_checkpoint.dist, "rank", lambda: 1)
    draws = []
    for _ in range(2):
        torch.manual_seed(99)
        load(ShardedCheckpointer(), path, model, optimizer)
        draws.append((torch.rand(3), random.random()))
    torch.manual_seed(derived_seed(0, 5, 1))
    random.seed(derived_seed(0, 5, 1))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]
    assert torch.equal(draws[0][0], torch.rand(3)) and draws[0][1] == random.random()


def test_optimizer_in_backward_and_its_schedule_resume(tmp_path):
    from tunewright.training.lr_schedule import cosine_with_warmup
    from tunewright.training.optim_in_backward import OptimizerInBackward

    def build(seed):
        model, _ = make(seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = OptimizerInBackward(trainable, lambda ps: torch.optim.AdamW(ps, lr=0.05))
        return model, optimizer, cosine_with_warmup(optimizer, num_training_steps=8, num_warmup_steps=2)

    def steps(model, optimizer, schedule, n):
        out = []
        for _ in range(n):
            out += train(model, optimizer, 1)
            schedule.step()
        return out

    model, optimizer, schedule = build(0)
    steps(model, optimizer, schedule, 3)
    path = ShardedCheckpointer().save(str(tmp_path), 3, TrainState(model=model, optimizer=optimizer,
                                                                    schedule=schedule), run_state={"step": 3})
    expected = steps(model, optimizer, schedule, 5)
    other, other_opt, other_schedule = build(1)
    other.base.load_state_dict(model.base.state_dict())
    ShardedCheckpointer().load(path, TrainState(model=other, optimizer=other_opt, schedule=other_schedule))
    # the schedule sets the lr through the outer groups: they must be the loaded inner ones
    assert steps(other, other_opt, other_schedule, 5) == expected


# ---------------------------------------------------------------- FSDP2 over 2 processes (gloo)
COMMON = ["--save-every", "2", "--max-steps", "8"]


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference")
    torchrun(2, SCRIPT, ["--out", out, "--max-steps", "8"])
    return losses(out)


@pytest.mark.slow
def test_fsdp2_resume_from_2_processes_on_1_and_from_1_on_2(tmp_path, reference):
    # 2 processes (batch 2 each), async saves at steps 2 and 4, interrupted after step 5;
    # 1 process (batch 4) continues from step 4
    two = tmp_path / "two"
    torchrun(2, SCRIPT, ["--out", two, *COMMON, "--stop-after", "5", "--async-save"])
    assert [s for s, _ in step_dirs(two)] == [2, 4]
    before = metric_lines(two)
    torchrun(1, SCRIPT, ["--out", two, *COMMON, "--resume", "auto"])
    assert_resumed_at(two, before, 4)
    assert_same_losses(losses(two), reference)

    # 1 process saves at step 2 and stops after 3; 2 processes continue (rank 1's RNG derived)
    one = tmp_path / "one"
    torchrun(1, SCRIPT, ["--out", one, *COMMON, "--stop-after", "3"])
    before = metric_lines(one)
    torchrun(2, SCRIPT, ["--out", one, *COMMON, "--resume", "auto", "--async-save"])
    assert_resumed_at(one, before, 2)
    assert_same_losses(losses(one), reference)
    assert [s for s, _ in step_dirs(one)] == [6, 8]  # the last async save was waited for
