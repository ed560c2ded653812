"""ResumableSampler: sharding, per-epoch shuffles, exact resume, length grouping."""

from __future__ import annotations

import itertools

import pytest
import torch

from tunewright.data import ResumableSampler


def run(sampler, epochs):
    """Indices of `epochs` consecutive epochs, driven the way a recipe drives them."""
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out += list(sampler)
    return out


def padding(indices, lengths, batch_size):
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("num_samples", [20, 23])
def test_ranks_partition_every_epoch(num_samples):
    for epoch in range(3):
        shards = []
        for rank in range(2):
            sampler = ResumableSampler(num_samples, seed=1, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == len(sampler)
        assert set(shards[0]) | set(shards[1]) == set(range(num_samples))
        # an odd count is evened out by repeating one index, as DistributedSampler does
        assert len(set(shards[0]) & set(shards[1])) == num_samples % 2


def test_epochs_differ_and_repeat_across_runs():
    a = run(ResumableSampler(50, seed=3), range(2))
    b = run(ResumableSampler(50, seed=3), range(2))
    assert a == b
    assert a[:50] != a[50:] and sorted(a[:50]) == sorted(a[50:]) == list(range(50))
    assert run(ResumableSampler(50, seed=4), range(1)) != a[:50]
    assert run(ResumableSampler(5, shuffle=False), range(2)) == [0, 1, 2, 3, 4] * 2


def test_iterating_without_set_epoch_moves_to_the_next_epoch():
    sampler = ResumableSampler(30, seed=0)
    first, second = list(sampler), list(sampler)
    assert first != second and sampler.state_dict().items() >= {"epoch": 2, "index": 0}.items()


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("stop_after", [0, 7, 30, 31])
def test_resume_mid_epoch_continues_the_uninterrupted_order(group_by_length, stop_after):
    lengths = torch.randint(1, 100, (61,), generator=torch.Generator().manual_seed(0)).tolist()

    def make():
        return ResumableSampler(
            61, seed=5, rank=1, world_size=2, group_by_length=group_by_length,
            lengths=lengths, batch_size=2, megabatch_batches=3,
        )

    reference = run(make(), range(3))
    interrupted = make()
    taken = run(interrupted, range(1))
    interrupted.set_epoch(1)
    taken += list(itertools.islice(iter(interrupted), stop_after))  # then the job dies
    state = interrupted.state_dict()
    # after the last index of epoch 1 (31 per rank) the state already points at epoch 2
    expected = {"epoch": 2, "index": 0} if stop_after == 31 else {"epoch": 1, "index": stop_after}
    assert state.items() >= expected.items()

    resumed = make()
    resumed.load_state_dict(state)
    assert taken + run(resumed, range(state["epoch"], 3)) == reference


def test_resume_from_a_recipe_counted_end_of_epoch():
    # A recipe may save {epoch, batches_done * batch_size}; a finished epoch then yields nothing.
    reference = run(ResumableSampler(10, seed=2), range(3))
    resumed = ResumableSampler(10, seed=2)
    resumed.load_state_dict({"epoch": 1, "index": 10})
    assert run(resumed, range(1, 3)) == reference[20:]


def test_group_by_length_cuts_padding_and_still_covers_every_index():
    num_samples, batch_size = 1000, 8
    lengths = torch.randint(1, 512, (num_samples,), generator=torch.Generator().manual_seed(0))
    lengths = lengths.tolist()
    plain = run(ResumableSampler(num_samples, seed=0), range(1))
    grouped_sampler = ResumableSampler(
        num_samples, seed=0, group_by_length=True, lengths=lengths, batch_size=batch_size
    )
    grouped = run(grouped_sampler, range(2))
    every_index = list(range(num_samples))
    assert sorted(grouped[:num_samples]) == sorted(grouped[num_samples:]) == every_index
    assert grouped[:num_samples] != grouped[num_samples:]  # still shuffled per epoch
    assert padding(grouped[:num_samples], lengths, batch_size) < 0.2 * padding(
        plain, lengths, batch_size
    )


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lengths"):
        ResumableSampler(10, group_by_length=True)
    with pytest.raises(ValueError, match="index"):
        ResumableSampler(10).load_state_dict({"epoch": 0, "index": 11})
