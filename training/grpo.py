"""GRPO and its successors as functions on tensors: group-normalised advantages, the clipped
policy loss of each `loss_type`, its metrics, and the helpers around them (TRL's names).

    adv = group_advantages(rewards, num_generations=8, scale_rewards="group")      # [N]
    mask = completion_mask(lengths, truncated, mask_truncated=True)               # [N, T]
    loss, metrics = policy_loss(logps, old_logps, adv, mask, loss_type="dapo",
                                num_tokens=step_tokens, ...)                      # loss.backward()

Rows are prompt-major (`training/rollout.py`): rows g*G .. g*G+G-1 are the G generations of
prompt g. Per-token tensors are [N, T] (completion tokens of each row, left-aligned, padding
masked by `mask`).

Advantages (GRPO, DeepSeekMath eq. 3; TRL's `scale_rewards`), for row i of group g:
    A_i = (r_i - mean_g(r)) / (std + 1e-4)
with std the unbiased std of the group (`group`) or of the whole batch (`batch`), or no
division at all (`none`, Dr. GRPO). A group whose rewards are all equal has A = 0: it moves
nothing (`zero_variance_groups` finds them for DAPO's dynamic sampling).

The policy loss, per token t of row i (PPO's clipped surrogate, with w the importance ratio):
    w_it = exp(logp_it - old_it)                          importance_sampling_level=token
    w_i  = exp(sum_t m_it (logp_it - old_it) / |o_i|)     sequence (GSPO: length-normalised)
    l_it = -min(w A_i, clip(w, 1 - epsilon, 1 + epsilon_high) A_i) + beta * KL_it
    KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3, >= 0, 0 at equality)
and its normaliser:
    grpo     sum_i (sum_t m l / |o_i|) / num_sequences       per-sequence mean, then over rows
    bnpo     sum_it m l / (tokens of this batch) / num_batches   token mean of each micro-batch
    dr_grpo  sum_it m l / (num_sequences * max_completion_length)
    dapo     sum_it m l / num_tokens                           token mean over the whole step
`num_sequences`, `num_tokens` and `num_batches` are those of the whole optimizer step over all
data-parallel ranks (micro-batches' gradients add up, and FSDP sums over ranks), so that
splitting a step into micro-batches or ranks gives the update of one batch; left out, they are
this batch's own, which is TRL's loss with one micro-batch on one process.

Below the formulas, the model side of a step: `rollout_batch` (rows prompt + completion, the
completion as targets), `completion_logprobs` (log-probs and entropies from hidden states, the
head chunk by chunk as `objectives.token_logprobs`), `padded` (flat values -> [N, T]), and the
recipe's plumbing, `check_grpo_config` and `micro_batches`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
Level = Literal["token", "sequence"]
STD_EPS = 1e-4  # TRL's: a group of equal rewards divides 0 by 1e-4, not by 0


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations="
                         f"{num_generations}")
    return rewards.view(-1, num_generations)


def group_advantages(rewards: Tensor, num_generations: int, *, scale_rewards: ScaleRewards = "group") -> Tensor:
    """A_i = (r_i - group mean) / (std + 1e-4), std of the group, of the batch, or none (module
    docstring). [N] rewards of prompt-major rows -> [N] advantages."""
    grouped = _groups(rewards, num_generations)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if num_generations > 1 \
            else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return centred / (std + STD_EPS)


def zero_variance_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """[num_groups] bool: the groups whose G rewards are all equal (no learning signal; DAPO's
    dynamic sampling drops them)."""
    grouped = _groups(rewards, num_generations)
    return (grouped == grouped[:, :1]).all(dim=1)


def resample_pool(train: Any, seed: int) -> Any:
    """The prompts DAPO's resampling draws from: the training prompts again, in an order of
    their own (another seed), endless (epoch after epoch), resumable as a `TrainState` entry;
    the run's own step schedule is not touched."""
    import copy

    from tunewright.training.batching import Batches, StepBatches

    sampler = copy.copy(train.sampler)
    sampler.seed, sampler.epoch = seed, 0
    if hasattr(sampler, "index"):
        sampler.index = 0
    pool = Batches(train.dataset, sampler, train.batch_size, train.collate)
    return StepBatches(pool, epochs=1_000_000)


def refill_groups(prompts: list, out: Any, scores: Tensor, draw: Callable[[], tuple[list, Any, Tensor]], *,
                  num_generations: int, total: Callable[[Tensor], Tensor], max_rounds: int) -> tuple[list, Any, Tensor, int]:
    """DAPO's dynamic sampling with resampling: while some group's G rewards are all equal and
    rounds remain, `draw()` (prompts, rollouts, [N, K] scores) of fresh prompts, whose groups
    with varied rewards take the places of equal ones, in order. Groups still equal after
    `max_rounds` stay (the recipe leaves them out of the step). Under FSDP every process rolls
    out as long as any one still needs groups (the forwards gather weights together). Returns
    (prompts, rollouts, scores, rounds drawn)."""
    from tunewright.training.distributed import any_rank

    g = num_generations
    rounds = 0
    while rounds < max_rounds:
        equal = zero_variance_groups(total(scores), g).tolist()
        if not any_rank(any(equal), scores.device):
            break
        new_prompts, new_out, new_scores = draw()
        rounds += 1
        varied = [j for j, e in enumerate(zero_variance_groups(total(new_scores), g).tolist()) if not e]
        for i, j in zip((i for i, e in enumerate(equal) if e), varied):
            rows, new_rows = slice(i * g, (i + 1) * g), slice(j * g, (j + 1) * g)
            prompts[i] = new_prompts[j]
            for field in ("prompts", "completions", "logprobs", "truncated"):
                getattr(out, field)[rows] = getattr(new_out, field)[new_rows]
            scores[rows] = new_scores[new_rows]
    return prompts, out, scores, rounds


def rollout_metrics(zero_std_groups: Tensor, lengths: Tensor, truncated: Tensor) -> dict[str, Tensor]:
    """The step's rollout figures over every data-parallel rank (each rank has its own groups):
    `frac_reward_zero_std`, `completion_length` (mean, max) and the `truncated` fraction."""
    from tunewright.training.distributed import all_reduce_max, all_reduce_sum

    device = lengths.device
    sums = all_reduce_sum(torch.stack([zero_std_groups.double().sum(), torch.tensor(float(zero_std_groups.numel())),
                                       lengths.double().sum(), truncated.double().sum(),
                                       torch.tensor(float(lengths.numel()))]).to(device))
    longest = all_reduce_max(lengths.max().to(device).clone())
    return {"frac_reward_zero_std": sums[0] / sums[1].clamp(min=1), "completion_length": sums[2] / sums[4],
            "completion_length_max": longest, "truncated": sums[3] / sums[4]}


def completion_mask(lengths: Tensor, truncated: Tensor | None = None, *, mask_truncated: bool = False,
                    width: int | None = None) -> Tensor:
    """[N, T] float mask of the completion tokens of rows of `lengths`; with `mask_truncated`
    (TRL's `mask_truncated_completions`), rows that hit max_new_tokens without a stop token
    are masked whole: they count neither in the loss nor in its normalisers."""
    width = int(lengths.max()) if width is None else width
    mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()
    if mask_truncated and truncated is not None:
        mask = mask * (~truncated.bool()).float()[:, None]
    return mask


def soft_overlong_penalty(lengths: Tensor, *, max_completion_length: int, soft_punish_cache: int) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), a reward per row from its completion length L:
    0 for L <= max - cache, (max - cache - L) / cache up to max, -1 beyond."""
    if not 0 <= soft_punish_cache <= max_completion_length:
        raise ValueError(f"soft_punish_cache ({soft_punish_cache}) must be in [0, max_completion_length="
                         f"{max_completion_length}]")
    lengths = lengths.float()
    start = max_completion_length - soft_punish_cache
    ramp = (start - lengths) / max(soft_punish_cache, 1)
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_completion_length, ramp, -torch.ones_like(lengths)))


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def importance_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: Level = "token") -> Tensor:
    """w: [N, T] per token, or GSPO's [N, 1] exp of the masked mean log-ratio per sequence."""
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        return torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "dapo",
    importance_sampling_level: Level = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    entropies: Tensor | None = None,
    max_completion_length: int | None = None,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_batches: float | Tensor = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This batch's share of the step's loss (module docstring) and its metrics: per-token
    (per-sequence at the sequence level) values whose mean over the step is logged, `kl`,
    `entropy`, `clip_ratio/low`, `clip_ratio/high`, `clip_ratio/region` (TRL's clip fractions:
    a token is low-clipped when w < 1 - epsilon with A < 0, high-clipped when w > 1 +
    epsilon_high with A > 0: there the gradient is zero)."""
    if beta and ref_logps is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logps (the reference's log-probs)")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    w = importance_weights(logps, old_logps, mask, importance_sampling_level)
    per_token = -torch.min(w * adv, torch.clamp(w, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    masked = per_token * mask  # [N, T]: a sequence-level loss broadcasts over its tokens
    rows = mask.shape[0]
    if loss_type == "grpo":
        seqs = rows if num_sequences is None else num_sequences
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / seqs
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0) / num_batches
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("policy_loss: loss_type dr_grpo needs max_completion_length")
        seqs = rows if num_sequences is None else num_sequences
        loss = masked.sum() / (seqs * max_completion_length)
    elif loss_type == "dapo":
        tokens = mask.sum() if num_tokens is None else num_tokens
        loss = masked.sum() / torch.as_tensor(tokens, dtype=masked.dtype).clamp(min=1.0)
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")

    with torch.no_grad():
        keep = mask.bool()

        def per_unit(x: Tensor) -> Tensor:  # sequence-level values count once per sequence
            return x.squeeze(1) if x.shape[1] == 1 else x[keep]

        low = (w < 1 - eps_low) & (adv < 0)
        high = (w > 1 + eps_high) & (adv > 0)
        metrics = {"clip_ratio/low": per_unit(low.float()), "clip_ratio/high": per_unit(high.float()),
                   "clip_ratio/region": per_unit((low | high).float())}
        if kl is not None:
            metrics["kl"] = kl[keep]
        if entropies is not None:
            metrics["entropy"] = entropies[keep]
    return loss, metrics


# ---------------------------------------------------------------------- from the model
def rollout_batch(prompts: list[list[int]], completions: list[list[int]]) -> dict:
    """Rows prompt + completion as one padding-free batch whose targets are the completion
    tokens (the labels are shifted: position i predicts token i + 1), on the host."""
    from tunewright.data.collate import collate_flat
    from tunewright.data.tokenizer.base import IGNORE_INDEX

    items = [{"tokens": p + c, "labels": [IGNORE_INDEX] * (len(p) - 1) + c + [IGNORE_INDEX]}
             for p, c in zip(prompts, completions)]
    return collate_flat(items)


def shares_prompts(model: nn.Module) -> bool:
    """Whether `shared_prompt_batch` computes for this model what `rollout_batch` does: every
    layer attends causally without a window or chunk (those count distance in positions, which
    the explicit mask's layout does not keep in index order)."""
    layers = getattr(model, "layers", None)
    return layers is not None and all(
        getattr(layer.attn, "sliding_window", None) is None and getattr(layer.attn, "chunk_size", None) is None
        for layer in layers)


def shared_prompt_batch(prompts: list[list[int]], completions: list[list[int]]) -> dict:
    """The rows of `rollout_batch` with each prompt computed once for the consecutive rows that
    share it (a GRPO group): one row per group, [prompt[:-1], prompt[-1] + completion 1,
    prompt[-1] + completion 2, ...], where each completion sees the shared prompt and itself
    (explicit mask) at the positions it had in its own row. The last prompt token is repeated
    per completion as it predicts each one's first token. The targets come out in the order
    of `rollout_batch`'s (row by row), with the same numbers up to summation order; the
    forward costs P + sum(1 + C_i) tokens instead of sum(P + C_i): with G = 8 and a prompt
    much longer than the replies, about 1/8. Host tensors, padded to the longest group."""
    from tunewright.data.tokenizer.base import IGNORE_INDEX

    groups: list[list[int]] = []  # row indices of each run of one prompt
    for i, p in enumerate(prompts):
        if groups and prompts[groups[-1][0]] == p:
            groups[-1].append(i)
        else:
            groups.append([i])
    seqs = []
    for rows in groups:
        p = prompts[rows[0]]
        tokens, pos, labels, seg, row_of = list(p[:-1]), list(range(len(p) - 1)), [IGNORE_INDEX] * (len(p) - 1), \
            [0] * (len(p) - 1), [-1] * (len(p) - 1)
        for k, r in enumerate(rows, start=1):
            c = completions[r]
            tokens += [p[-1], *c]
            pos += range(len(p) - 1, len(p) + len(c))
            labels += [*c, IGNORE_INDEX]
            seg += [k] * (len(c) + 1)
            row_of += [r] * (len(c) + 1)
        seqs.append((tokens, pos, labels, seg, row_of))
    n, width = len(seqs), max(len(q[0]) for q in seqs)
    out = {"tokens": torch.zeros(n, width, dtype=torch.long), "input_pos": torch.zeros(n, width, dtype=torch.long),
           "labels": torch.full((n, width), IGNORE_INDEX, dtype=torch.long),
           "target_rows": torch.full((n, width), -1, dtype=torch.long)}
    segment = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
    for i, (tokens, pos, labels, seg, row_of) in enumerate(seqs):
        m = len(tokens)
        for key, values in (("tokens", tokens), ("input_pos", pos), ("labels", labels), ("target_rows", row_of)):
            out[key][i, :m] = torch.tensor(values)
        segment[i, :m] = torch.tensor(seg)
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    visible = causal & ((k_seg == 0) | (k_seg == q_seg)) & (q_seg >= 0)
    visible |= torch.eye(width, dtype=torch.bool)  # padding sees itself (no empty softmax row)
    out["attn_mask"] = visible[:, None]  # [n, 1, width, width]
    out["num_targets"] = int((out["labels"] != IGNORE_INDEX).sum())
    out["num_tokens"] = sum(len(q[0]) for q in seqs)  # computed, less the padding
    return out


def _chunk_logprobs_entropy(head: nn.Module, h: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(dim=-1)
    with torch.no_grad():  # a metric: no gradient, and nothing kept for backward
        entropy = lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    return logits.gather(1, t[:, None]).squeeze(1) - lse, entropy


def completion_logprobs(model: nn.Module, batch: dict, *, chunk_size: int = 1024,
                        temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, entropy of the tempered distribution, batch row) of every target token, [n]
    each, in batch order: `objectives.token_logprobs`' numbers (the head applied chunk by
    chunk, each chunk's logits recomputed in backward, never [B, T, V]) plus the entropy."""
    from torch.utils.checkpoint import checkpoint

    from tunewright.data.tokenizer.base import IGNORE_INDEX
    from tunewright.modules.precision import compute_autocast
    from tunewright.training.objectives import hidden_states

    with compute_autocast(model, batch["tokens"].device):
        hidden, labels, rows = hidden_states(model, batch)
        keep = labels != IGNORE_INDEX
        h, t, rows = hidden[keep], labels[keep], rows[keep]  # [n, dim], [n], [n]
        logps, entropies = [], []
        for start in range(0, t.numel(), chunk_size):
            hc, tc = h[start:start + chunk_size], t[start:start + chunk_size]
            if torch.is_grad_enabled() and hc.requires_grad:
                lp, ent = checkpoint(_chunk_logprobs_entropy, model.head, hc, tc, temperature, use_reentrant=False)
            else:
                lp, ent = _chunk_logprobs_entropy(model.head, hc, tc, temperature)
            logps.append(lp)
            entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies), rows


def padded(values: Tensor, mask: Tensor) -> Tensor:
    """Flat per-token values [n] (rows in order, each row's tokens in order) as [N, T] where
    `mask` [N, T] is 1 (0 elsewhere); differentiable."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask.bool(), values)


# ---------------------------------------------------------------------- the recipe's plumbing
def check_grpo_config(cfg: object) -> None:
    """One line for a GRPO config whose step cannot be formed (see recipes/grpo.py)."""
    size, g = cfg.batch_size, cfg.num_generations
    if getattr(cfg, "max_resample_rounds", 0) and not getattr(cfg, "dynamic_sampling", False):
        raise ValueError("max_resample_rounds: resampling replaces the groups dynamic_sampling leaves out; "
                         "set dynamic_sampling: true, or max_resample_rounds: 0")
    if size % g:
        raise ValueError(f"num_generations ({g}) does not divide batch_size ({size}): a step samples "
                         f"batch_size / num_generations prompts, num_generations completions each; "
                         f"set batch_size to a multiple of {g}")
    pieces = cfg.num_minibatches * cfg.gradient_accumulation_steps
    if pieces > size:
        raise ValueError(f"num_minibatches x gradient_accumulation_steps ({cfg.num_minibatches} x "
                         f"{cfg.gradient_accumulation_steps}) is more than the batch_size ({size}) completions "
                         "of a step: some micro-batches would be empty")


def micro_batches(num_rows: int, *, num_minibatches: int, accumulation: int) -> list[list[slice]]:
    """The rows of a rollout as `num_minibatches` minibatches (one optimizer step each) of
    `accumulation` micro-batches, as slices of near-equal size."""
    bounds = torch.linspace(0, num_rows, num_minibatches * accumulation + 1).round().long().tolist()
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return [slices[i * accumulation:(i + 1) * accumulation] for i in range(num_minibatches)]
