"""PPO for language models (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation
details of RLHF with PPO"): pure functions on [rows, completion tokens] tensors, with a `mask`
that is True on each completion's real tokens (its stop token included, padding excluded).

    rewards = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = masked_whiten(advantages, mask)
    loss = policy_loss(new_logprobs, logprobs, advantages, mask, clip=0.2).loss \
        + vf_coef * value_loss(new_values, values, returns, mask, clip=0.2).loss

The score of a completion (a reward model's, or reward functions') is paid on its last real
token; every token also pays the KL penalty against the reference, -kl_coef * KL_t, with KL_t
k1 = log π - log π_ref (unbiased, can be negative) or k3 = (r - 1) - log r, r = π_ref / π
(Schulman's low-variance estimator, >= 0).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch

Tensor = torch.Tensor


def last_token_index(mask: Tensor) -> Tensor:
    """[rows] index of each row's last real token (0 for a row without any)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token KL(π || π_ref) estimate from the sampled tokens' log-probs."""
    log_ratio = ref_logprobs - logprobs  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl_estimator must be k1 or k3, got {estimator!r}")


def token_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kl_coef: float,
                  estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """[rows, T] rewards: -kl_coef * KL_t on every real token, plus the row's score on its last."""
    rewards = (-kl_coef * kl_estimate(logprobs, ref_logprobs, estimator)).masked_fill(~mask, 0.0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last_token_index(mask)), scores.to(rewards.dtype), accumulate=True)


def missing_stop_penalty(scores: Tensor, stopped: Tensor, penalty: float | None) -> Tensor:
    """Scores with `penalty` subtracted from completions that never produced a stop token
    (cut by the length limit): an answer that does not end should not win on content."""
    return scores if penalty is None else scores - penalty * (~stopped).to(scores.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left:

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1},   returns_t = A_t + V_t

    with V and A zero past a row's last real token. Returns (advantages, returns), zero on
    padding."""
    values = values.masked_fill(~mask, 0.0)
    rewards = rewards.masked_fill(~mask, 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values).masked_fill(~mask, 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the real tokens (unbiased variance, as TRL and
    OpenAI's lm-human-preferences); `shift_mean=False` keeps the mean (rewards whitening).
    Padding comes back as 0. `reduce` sums a tensor over the data-parallel ranks
    (`batching.global_sum`): every rank then whitens with the whole batch's mean and variance,
    as one process holding all the rows would."""
    total = (lambda t: t) if reduce is None else reduce
    n = total(mask.sum().to(x.dtype))
    if n < 2:
        raise ValueError("whitening needs at least 2 real tokens in the batch (raise the minibatch size)")
    mean = total((x * mask).sum()) / n
    var = total(((x - mean) ** 2 * mask).sum()) / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask, 0.0)


class ClippedLoss(NamedTuple):
    loss: Tensor  # mean over the real tokens
    clip_fraction: Tensor  # share of real tokens where the clipped term was the one taken


def policy_loss(new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip: float = 0.2) -> ClippedLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, averaged over real tokens:

        r = exp(log π - log π_old),   L = max(-A r, -A clip(r, 1 - ε, 1 + ε))

    At r = 1 (the first pass over a batch) it is -mean(A) and its gradient -A ∇log π."""
    ratio = (new_logprobs - old_logprobs).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return ClippedLoss(masked_mean(torch.maximum(unclipped, clipped), mask),
                       masked_mean((clipped > unclipped).float(), mask))


def value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None = 0.2) -> ClippedLoss:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, ±ε): the
    value may not move further than ε from the one the rollout used (None: no clipping)."""
    unclipped = (new_values - returns) ** 2
    if clip is None:
        return ClippedLoss(0.5 * masked_mean(unclipped, mask), new_values.new_zeros(()))
    clipped_values = old_values + (new_values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return ClippedLoss(0.5 * masked_mean(torch.maximum(unclipped, clipped), mask),
                       masked_mean((clipped > unclipped).float(), mask))
