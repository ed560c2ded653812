"""DAPO's resampling (training/grpo.py refill_groups): fresh prompts' groups with varied rewards
take the places of groups whose G rewards are all equal, in order, for at most max_rounds."""

from __future__ import annotations

import torch

from tunewright.training.grpo import refill_groups, zero_variance_groups
from tunewright.training.rollout import Rollouts

G = 2


def _batch(tag: str, rewards: list[float]) -> tuple[list, Rollouts, torch.Tensor]:
    n = len(rewards)
    prompts = [f"{tag}{i}" for i in range(n // G)]
    out = Rollouts(prompts=[[i // G] for i in range(n)], completions=[[f"{tag}{i}"] for i in range(n)],
                   logprobs=[torch.tensor([float(i)]) for i in range(n)], truncated=[False] * n)
    return prompts, out, torch.tensor(rewards)[:, None]


def _total(scores: torch.Tensor) -> torch.Tensor:
    return scores.sum(dim=1)


def test_equal_groups_are_replaced_in_order_by_the_varied_groups_of_a_fresh_draw():
    prompts, out, scores = _batch("a", [1, 1, 0, 1, 0, 0])  # groups: equal, varied, equal
    draws = iter([_batch("b", [1, 1, 1, 0, 0, 1])])  # groups: equal, varied, varied
    prompts, out, scores, rounds = refill_groups(prompts, out, scores, lambda: next(draws), num_generations=G,
                                                 total=_total, max_rounds=3)
    assert rounds == 1  # every group varied after one draw: no second one
    assert prompts == ["b1", "a1", "b2"]
    assert out.completions == [["b2"], ["b3"], ["a2"], ["a3"], ["b4"], ["b5"]]
    assert [float(x) for x in out.logprobs] == [2.0, 3.0, 2.0, 3.0, 4.0, 5.0]
    assert scores[:, 0].tolist() == [1, 0, 0, 1, 0, 1]
    assert not zero_variance_groups(_total(scores), G).any()


def test_rounds_stop_at_max_rounds_and_equal_groups_stay():
    prompts, out, scores = _batch("a", [1, 1, 0, 1])
    calls = []

    def draw():
        calls.append(1)
        return _batch("b", [0, 0, 1, 1])  # nothing varied to take

    prompts, out, scores, rounds = refill_groups(prompts, out, scores, draw, num_generations=G, total=_total,
                                                 max_rounds=2)
    assert rounds == len(calls) == 2 and prompts == ["a0", "a1"]
    assert zero_variance_groups(_total(scores), G).tolist() == [True, False]


def test_no_draw_when_no_group_is_equal():
    prompts, out, scores = _batch("a", [1, 0, 0, 1])
    _, _, _, rounds = refill_groups(prompts, out, scores, lambda: (_ for _ in ()).throw(AssertionError("drew")),
                                    num_generations=G, total=_total, max_rounds=5)
    assert rounds == 0
