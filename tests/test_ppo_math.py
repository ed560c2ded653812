"""PPO's pieces (`training/ppo.py`) against vectors computed by hand from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from tunewright.training.ppo import (gae, kl_estimate, last_token_index, masked_whiten, missing_stop_penalty,
                                     policy_loss, token_rewards, value_loss)

MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_gae_with_gamma_1_and_lambda_0_95_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -0.5, 9.0]])  # 9.0 sits on padding: ignored
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.1, 5.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    # Row 0: δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1; δ0 = 0.6 - 0.5 = 0.1
    #        A2 = 0.3, A1 = 0.1 + 0.95 * 0.3 = 0.385, A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # Row 1 (2 tokens): δ1 = -0.5 + 0 - 0.1 = -0.6; δ0 = 0 + 0.1 - 0.2 = -0.1
    #        A1 = -0.6, A0 = -0.1 + 0.95 * -0.6 = -0.67
    want_adv = torch.tensor([[0.46575, 0.385, 0.3], [-0.67, -0.6, 0.0]])
    want_ret = torch.tensor([[0.96575, 0.985, 1.0], [-0.47, -0.5, 0.0]])
    assert torch.allclose(advantages, want_adv, atol=1e-6)
    assert torch.allclose(returns, want_ret, atol=1e-6)


def test_gae_with_discount_by_hand():
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    advantages, _ = gae(rewards, values, torch.ones(1, 2, dtype=torch.bool), gamma=0.5, lam=1.0)
    assert advantages.tolist() == [[1.0 + 0.5 * 2.0, 2.0]]  # λ = 1: discounted return - V


def test_whitening_matches_the_formula_with_bessel():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    real = [1.0, 2.0, 3.0, 4.0]
    mean = sum(real) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in real) / 3 + 1e-8)
    got = masked_whiten(x, mask)
    assert torch.allclose(got[mask], torch.tensor([(v - mean) / std for v in real]), atol=1e-6)
    assert got[~mask].tolist() == [0.0, 0.0]
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept[mask], torch.tensor([(v - mean) / std + mean for v in real]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_whiten(x, torch.tensor([[True, False, False], [False, False, False]]))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_clips_by_hand():
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 7.0]])
    logp = torch.randn(2, 3)
    at_one = policy_loss(logp.clone().requires_grad_(), logp, adv, MASK)
    assert at_one.loss.item() == pytest.approx(-(1 - 2 + 0.5 + 3 + 1) / 5)
    assert at_one.clip_fraction.item() == 0.0
    # ratio 1.5 everywhere, ε 0.2: A > 0 takes the clipped 1.2 (clipped), A < 0 takes -A * 1.5.
    new = logp + math.log(1.5)
    got = policy_loss(new, logp, adv, MASK, clip=0.2)
    per_token = [-1.0 * 1.2, 2.0 * 1.5, -0.5 * 1.2, -3.0 * 1.2, -1.0 * 1.2]
    assert got.loss.item() == pytest.approx(sum(per_token) / 5)
    assert got.clip_fraction.item() == pytest.approx(4 / 5)


def test_policy_gradient_at_ratio_one_is_minus_advantage():
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    logp = torch.zeros(1, 3, requires_grad=True)
    policy_loss(logp, logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool)).loss.backward()
    assert torch.allclose(logp.grad, -adv / 3)


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    new = torch.tensor([[1.5, 0.9, 3.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = value_loss(new, old, returns, mask, clip=0.2)
    # token 0: unclipped (1.5-2)^2 = .25, clipped V 1.2: (1.2-2)^2 = .64 -> .64 (clipped)
    # token 1: (0.9-1)^2 = .01, clipped 0.9 (within ε): .01 -> .01
    # token 2: (3-0)^2 = 9, clipped 1.2: 1.44 -> 9
    assert got.loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 9.0) / 3)
    assert got.clip_fraction.item() == pytest.approx(1 / 3)
    assert value_loss(new, old, returns, mask, clip=None).loss.item() == pytest.approx(0.5 * (0.25 + 0.01 + 9) / 3)


def test_kl_estimators_and_token_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.2], [-0.5, -1.0, 0.0]])
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.allclose(k1, logp - ref)
    r = (ref - logp).exp()
    assert torch.allclose(k3, (r - 1) - (ref - logp))
    assert bool((k3 >= 0).all()) and k3[0, 1].item() == 0.0  # equal log-probs: no KL
    assert last_token_index(MASK).tolist() == [2, 1]
    rewards = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, MASK, kl_coef=0.1)
    want = -0.1 * (logp - ref)
    want[0, 2] += 2.0
    want[1, 1] += -1.0
    want[1, 2] = 0.0
    assert torch.allclose(rewards, want)
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_estimate(logp, ref, "k2")


def test_missing_stop_penalty():
    scores = torch.tensor([1.0, 1.0])
    assert missing_stop_penalty(scores, torch.tensor([True, False]), 1.5).tolist() == [1.0, -0.5]
    assert missing_stop_penalty(scores, torch.tensor([True, False]), None) is scores
