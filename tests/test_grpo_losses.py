"""GRPO losses (training/grpo.py) against TRL's own `GRPOTrainer._compute_loss` on random
tensors (TRL's method runs with a minimal stand-in `self` whose `_get_per_token_logps_and_entropies`
returns the given log-probs, so nothing of TRL's maths is re-typed here), and against their
formulas on fixed vectors."""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunewright.training import grpo as G

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

N, T, MAX_LEN = 8, 7, 9


def _inputs(seed: int, *, advantages: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    mask = G.completion_mask(lengths)
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 0.05
    # New log-probs near the old ones, far enough for both clip bounds to bite.
    logps = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    entropies = torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(N, generator=g, dtype=torch.float64) if advantages is None else advantages
    return logps, old, ref, entropies, adv, mask


def _trl(logps, old, ref, entropies, adv, mask, *, loss_type, level, beta, eps, eps_high):
    """TRL's loss and metrics for one micro-batch on one process."""
    metrics = defaultdict(lambda: defaultdict(list))
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, sync_gradients=True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN, accelerator=accelerator, _metrics=metrics,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        get_off_policy_mask=trl_grpo.GRPOTrainer.get_off_policy_mask)
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


CASES = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [0.0, 0.04]))


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_loss_gradient_and_metrics_equal_trl(loss_type, level, beta):
    eps, eps_high = 0.2, 0.28  # clip-higher
    logps, old, ref, entropies, adv, mask = _inputs(CASES.index((loss_type, level, beta)))
    ours_in = logps.clone().requires_grad_(True)
    theirs_in = logps.clone().requires_grad_(True)
    ours, metrics = G.policy_loss(ours_in, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                                  epsilon=eps, epsilon_high=eps_high, beta=beta, ref_logps=ref,
                                  entropies=entropies, max_completion_length=MAX_LEN)
    theirs, trl_metrics = _trl(theirs_in, old, ref, entropies, adv, mask, loss_type=loss_type, level=level,
                               beta=beta, eps=eps, eps_high=eps_high)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)
    assert ours_in.grad.abs().sum() > 0
    for key in ("low", "high", "region"):
        assert metrics[f"clip_ratio/{key}"].mean().item() == pytest.approx(trl_metrics[f"clip_ratio/{key}_mean"],
                                                                            abs=1e-6)
    assert metrics["entropy"].mean().item() == pytest.approx(trl_metrics["entropy"], abs=1e-6)
    if beta:
        assert metrics["kl"].mean().item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    if level == "token":  # the random tensors do exercise both clip bounds
        assert metrics["clip_ratio/low"].sum() > 0 and metrics["clip_ratio/high"].sum() > 0


# ---------------------------------------------------------------- fixed vectors
def test_advantages_of_one_right_answer_in_four():
    adv = G.group_advantages(torch.tensor([1.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]), 4)
    # mean 0.25, unbiased std 0.5: 0.75 / 0.5001 and -0.25 / 0.5001; the equal group gives 0
    torch.testing.assert_close(adv, torch.tensor([0.75 / 0.5001, *[-0.25 / 0.5001] * 3, 0, 0, 0, 0]))
    assert adv[0].item() == pytest.approx(1.4997, abs=1e-4) and adv[1].item() == pytest.approx(-0.4999, abs=1e-4)
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 0, 0])
    torch.testing.assert_close(G.group_advantages(rewards, 4, scale_rewards="none"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1]))
    batch_std = rewards.std()  # one std over all 8 (unbiased), group means kept
    torch.testing.assert_close(G.group_advantages(rewards, 4, scale_rewards="batch"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1]) / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="num_generations=3"):
        G.group_advantages(rewards, 3)


def test_zero_variance_groups_and_their_zero_gradient():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0.3, 0.3, 0.3])
    assert G.zero_variance_groups(rewards, 3).tolist() == [True, False, True]
    adv = G.group_advantages(rewards, 3)
    logps, old, _, _, _, mask = _inputs(3)
    logps, old, mask = (torch.cat([t, t[:1]]) for t in (logps, old, mask))  # 9 rows
    x = logps.clone().requires_grad_(True)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, _ = G.policy_loss(x, old, adv, mask, loss_type=loss_type, max_completion_length=MAX_LEN)
        (grad,) = torch.autograd.grad(loss, x)
        assert grad[:3].abs().max() == 0 and grad[6:].abs().max() == 0  # the equal groups
        assert grad[3:6].abs().max() > 0


def test_normalisers_of_each_loss_type():
    # At w = 1 the clipped surrogate is -A per token: each loss is -A summed with its weights.
    mask = G.completion_mask(torch.tensor([1, 3]), width=4)
    adv = torch.tensor([1.0, 2.0])
    logps = torch.zeros(2, 4)

    def loss(loss_type, **kw):
        return G.policy_loss(logps, logps, adv, mask, loss_type=loss_type, max_completion_length=10, **kw)[0].item()

    assert loss("grpo") == pytest.approx(-(1 + 2) / 2)  # mean of per-sequence means
    assert loss("bnpo") == pytest.approx(-(1 + 3 * 2) / 4)  # token mean of the batch
    assert loss("dr_grpo") == pytest.approx(-(1 + 3 * 2) / (2 * 10))  # rows x max_completion_length
    assert loss("dapo") == pytest.approx(-(1 + 3 * 2) / 4)
    # Over a step of more batches and ranks: the counts of the whole step.
    assert loss("dapo", num_tokens=14) == pytest.approx(-7 / 14)
    assert loss("grpo", num_sequences=6) == pytest.approx(-3 / 6)
    assert loss("dr_grpo", num_sequences=6) == pytest.approx(-7 / 60)
    assert loss("bnpo", num_batches=2) == pytest.approx(-7 / 4 / 2)


def test_two_micro_batches_give_the_dapo_gradient_of_the_whole_batch():
    logps, old, _, _, adv, mask = _inputs(5)
    x = logps.clone().requires_grad_(True)
    whole, _ = G.policy_loss(x, old, adv, mask, loss_type="dapo")
    (want,) = torch.autograd.grad(whole, x)
    tokens = mask.sum()
    parts = sum(G.policy_loss(x[s], old[s], adv[s], mask[s], loss_type="dapo", num_tokens=tokens)[0]
                for s in (slice(0, 3), slice(3, N)))
    (got,) = torch.autograd.grad(parts, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_clip_fractions_with_asymmetric_epsilon():
    # ratios 0.7, 0.85, 1.25, 1.35: epsilon 0.2 below, 0.3 above
    logps = torch.log(torch.tensor([[0.7, 0.85, 1.25, 1.35]]))
    mask = torch.ones(1, 4)
    for sign, low, high in ((-1.0, [1, 0, 0, 0], [0, 0, 0, 0]), (1.0, [0, 0, 0, 0], [0, 0, 0, 1])):
        _, m = G.policy_loss(logps, torch.zeros(1, 4), torch.tensor([sign]), mask, epsilon=0.2, epsilon_high=0.3)
        assert m["clip_ratio/low"].tolist() == low and m["clip_ratio/high"].tolist() == high
        assert m["clip_ratio/region"].tolist() == [a or b for a, b in zip(low, high)]
    # A high-clipped token with A > 0 gets no gradient; the one inside the range does.
    x = logps.clone().requires_grad_(True)
    loss, _ = G.policy_loss(x, torch.zeros(1, 4), torch.tensor([1.0]), mask, epsilon=0.2, epsilon_high=0.3)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad[0, 3] == 0 and grad[0, 2] != 0


def test_gspo_ratio_is_the_length_normalised_sequence_ratio():
    log_ratio = torch.tensor([[0.1, -0.3, 0.5, 9.0], [0.2, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    w = G.importance_weights(log_ratio, torch.zeros(2, 4), mask, "sequence")
    torch.testing.assert_close(w, torch.exp(torch.tensor([[0.3 / 3], [0.2]])))
    torch.testing.assert_close(G.importance_weights(log_ratio, torch.zeros(2, 4), mask, "token"), log_ratio.exp())


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    assert (G.k3_kl(a, b) >= 0).all()
    assert G.k3_kl(a, a).abs().max() == 0
    # its mean estimates KL(p || q) on samples of p: exact here on a two-point distribution
    p, q = torch.tensor([0.3, 0.7]), torch.tensor([0.6, 0.4])
    exact = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * G.k3_kl(p.log(), q.log())).sum(), exact)


def test_truncated_completions_are_masked():
    lengths, truncated = torch.tensor([2, 4, 3]), torch.tensor([False, True, False])
    assert G.completion_mask(lengths, truncated).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    mask = G.completion_mask(lengths, truncated, mask_truncated=True)
    assert mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    x = torch.zeros(3, 4, requires_grad=True)
    loss, _ = G.policy_loss(x, torch.zeros(3, 4), torch.tensor([1.0, 5.0, -1.0]), mask, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, x)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
    assert loss.item() == pytest.approx(-(2 * 1 - 3 * 1) / 5)  # the truncated row's tokens are not counted


def test_soft_overlong_penalty_equals_trl():
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, 30))
    want = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=8)([[1] * n for n in lengths])
    got = G.soft_overlong_penalty(torch.tensor(lengths), max_completion_length=20, soft_punish_cache=8)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_bad_options_are_one_line():
    logps, old, _, _, adv, mask = _inputs(0)
    with pytest.raises(ValueError, match="loss_type"):
        G.policy_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        G.policy_loss(logps, old, adv, mask, importance_sampling_level="word")
    with pytest.raises(ValueError, match="ref_logps"):
        G.policy_loss(logps, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        G.policy_loss(logps, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="scale_rewards"):
        G.group_advantages(torch.zeros(4), 2, scale_rewards="rank")
