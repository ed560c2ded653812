"""Preference losses: pure functions of sequence log-probs (`training/objectives.py
sequence_logprobs`: summed over each answer's target tokens, and their counts).

Each returns `(losses, metrics)`: `losses` one value per pair (per example for KTO), with
gradients, which the recipe sums and divides by the pairs of the whole optimizer step (so
accumulation and data parallelism give the update of one big batch); `metrics` detached per-pair
values (`rewards/chosen`, `rewards/rejected`, `margin`, `accuracy`, `logps/chosen`,
`logps/rejected`) that `MetricSums` averages over the step. Notation: π the policy, π_ref the
reference, y_w / y_l the chosen / rejected answer, |y| its number of tokens, σ the logistic
function, and the log-ratios

    Δ_w = log π(y_w|x) - log π_ref(y_w|x),   Δ_l likewise,   Δ = Δ_w - Δ_l.

Every loss (and its gradient) equals TRL's on the same log-probs (tests/test_preference_losses.py),
with one deliberate difference: ORPO's NLL term is the per-pair mean over the chosen answer's
tokens (the paper's L_SFT), where TRL averages over all tokens of the batch, prompt included.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tunewright.training.batching import Batch, Batches, global_sum, to_device

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


def _paired_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                    rejected_logps: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "margin": chosen_rewards - rejected_rewards,
            "accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}


def _dpo_metrics(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """Δ and the metrics of the reference-based losses: rewards β·Δ_w and β·Δ_l."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    metrics = _paired_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return chosen_ratio - rejected_ratio, metrics


def dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        *, beta: float = 0.1, label_smoothing: float = 0.0, robust: bool = False) -> tuple[Tensor, Metrics]:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290), eq. 7:

        L = -log σ(β Δ)

    `label_smoothing` ε > 0 assumes each label is flipped with probability ε: conservative DPO
    (cDPO, Mitchell 2023) L = -(1-ε) log σ(βΔ) - ε log σ(-βΔ); with `robust`, the unbiased
    robust DPO of Chowdhury et al. 2024 (arXiv:2403.00409), eq. 21:
    L = [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε), ε < 1/2."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    delta, metrics = _dpo_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    clean, flipped = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
    if robust:
        losses = ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)
    elif label_smoothing:
        losses = (1 - label_smoothing) * clean + label_smoothing * flipped
    else:
        losses = clean
    return losses, metrics


def hinge(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
          *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """The hinge loss of RSO / SLiC, Liu et al. 2023 (arXiv:2309.06657), eq. 10:

        L = max(0, 1 - β Δ)"""
    delta, metrics = _dpo_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return torch.relu(1 - beta * delta), metrics


def ipo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_counts: Tensor, rejected_counts: Tensor, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """IPO, Azar et al. 2023 (arXiv:2310.12036), eq. 17, with τ = β, on length-AVERAGED
    log-ratios (the form the paper's results use, as TRL has it):

        L = (Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))²

    (torchtune summed the log-ratios, which scales the loss with the answers' lengths)."""
    _, metrics = _dpo_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    chosen_avg = (chosen_logps - ref_chosen_logps) / chosen_counts.clamp(min=1)
    rejected_avg = (rejected_logps - ref_rejected_logps) / rejected_counts.clamp(min=1)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2, metrics


def simpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_counts: Tensor, rejected_counts: Tensor,
          *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), eq. 6: reference-free, length-normalised,
    with a target margin γ:

        L = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)

    `label_smoothing` ε mixes in the flipped label as cDPO does. Rewards are β·(mean log-prob)."""
    chosen_avg, rejected_avg = chosen_logps / chosen_counts.clamp(min=1), rejected_logps / rejected_counts.clamp(min=1)
    logits = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, _paired_metrics(beta * chosen_avg, beta * rejected_avg, chosen_logps, rejected_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_counts: Tensor, rejected_counts: Tensor,
         *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691), eqs. 6-7: reference-free, the SFT loss of the
    chosen answer plus λ (= `beta`, TRL's name) times the odds-ratio term, on mean log-probs
    P = exp(log π(y|x)/|y|):

        L = -log π(y_w|x)/|y_w| - λ log σ(log odds(y_w) - log odds(y_l)),  odds(y) = P/(1-P)

    Rewards are β·(mean log-prob), as TRL logs them."""
    chosen_avg = chosen_logps.float() / chosen_counts.clamp(min=1)
    rejected_avg = rejected_logps.float() / rejected_counts.clamp(min=1)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    metrics = _paired_metrics(beta * chosen_avg, beta * rejected_avg, chosen_logps, rejected_logps)
    metrics["log_odds_ratio"] = log_odds.detach()
    return losses, metrics


def chosen_nll(chosen_logps: Tensor, chosen_counts: Tensor) -> Tensor:
    """The SFT term RPO adds to a pairwise loss (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv:2404.19733, eq. 2): -log π(y_w|x) / |y_w| per pair, so that
    the chosen answer's likelihood rises, not only the margin (DPO alone can lower both; on
    reasoning tasks that costs accuracy). TRL's `loss_type: [sigmoid, sft]` (its older
    `rpo_alpha`) averages over all chosen tokens of the batch instead; the two agree when the
    chosen answers have equal lengths."""
    return -chosen_logps.float() / chosen_counts.clamp(min=1)


def kto_kl(logratio_sum: Tensor, count: Tensor) -> Tensor:
    """KTO's reference point z₀: the KL estimate mean(log π(y'|x) - log π_ref(y'|x)) over
    mismatched pairs (x, y'), clamped at 0 (a KL is never negative) and detached (no gradient
    flows through it, as in the paper's implementation and TRL)."""
    return (logratio_sum / count.clamp(min=1)).clamp(min=0).detach()


def kto(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, *, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Metrics]:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), eq. 7, unpaired: with r = log π(y|x) -
    log π_ref(y|x) and z₀ = `kl` (`kto_kl`),

        L = λ_D (1 - σ(β(r - z₀)))   for a desirable y,
            λ_U (1 - σ(β(z₀ - r)))   for an undesirable one,

    λ_D = `desirable_weight`, λ_U = `undesirable_weight` (the paper's eq. 8 keeps
    λ_D n_D / λ_U n_U in [1, 4/3])."""
    ratio = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return losses, {"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                    "logps/chosen": logps.detach()[desirable], "logps/rejected": logps.detach()[~desirable]}


REFERENCE_FREE = frozenset({"simpo", "orpo"})
LOSSES = ("dpo", "hinge", "ipo", "simpo", "orpo", "kto")


class MetricSums:
    """A step's metrics summed over its micro-batches and, in `means`, over the data-parallel
    ranks: each key's mean over all its values (KTO's desirable and undesirable examples count
    apart); a `margin` missing from paired values is the difference of the reward means."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.sums: dict[str, list[Tensor]] = {}

    def add(self, metrics: Metrics) -> None:
        for key, values in metrics.items():
            pair = torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                    device=values.device)])
            self.sums.setdefault(key, []).append(pair)

    def means(self, keys: Sequence[str]) -> dict[str, Tensor]:
        """Every rank calls this with the same `keys` (the collective needs it)."""
        totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=self.device)
        for i, key in enumerate(keys):
            for pair in self.sums.get(key, []):
                totals[i] += pair.to(self.device)
        global_sum(totals)
        out = {key: totals[i, 0] / totals[i, 1] for i, key in enumerate(keys) if totals[i, 1] > 0}
        if "margin" not in out and {"rewards/chosen", "rewards/rejected"} <= out.keys():
            out["margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        self.sums.clear()
        return out


def pair_count(micro_batches: Sequence[Batch], *, device: torch.device | str) -> Tensor:
    """Loss terms (pairs, or KTO's examples) of one optimizer step over all data-parallel ranks,
    as `batching.target_count` counts targets: a float tensor, at least 1."""
    n = torch.tensor(float(sum(int(b["num_pairs"]) for b in micro_batches)), device=device)
    return global_sum(n).clamp_(min=1.0)


# The metrics a preference recipe logs each step (those a loss does not give are left out).
LOGGED = ("rewards/chosen", "rewards/rejected", "margin", "accuracy", "logps/chosen", "logps/rejected")


def check_preference_config(cfg: Any) -> None:
    """ConfigError, before any work, for a `loss` the other keys cannot serve."""
    from tunewright.training.errors import ConfigError

    if cfg.precompute_ref_logps and cfg.loss in REFERENCE_FREE:
        raise ConfigError(f"precompute_ref_logps: loss {cfg.loss} uses no reference model; drop the key")
    if getattr(cfg, "rpo_alpha", 0.0) and cfg.loss in ("orpo", "kto"):
        reason = "has its own SFT term" if cfg.loss == "orpo" else "has no chosen answer to add it to"
        raise ConfigError(f"rpo_alpha: loss {cfg.loss} {reason}; set rpo_alpha: 0 or another loss")
    if cfg.precompute_ref_logps and cfg.loss == "kto":
        raise ConfigError("precompute_ref_logps: kto forms its KL rows from each batch, which a pass before "
                          "training cannot know; use LoRA (reference = adapters off) or a frozen copy (the default)")


def check_preference_data(loss: str, dataset: Any) -> None:
    """ValueError when the dataset's items do not fit the loss: KTO takes unpaired examples,
    the others pairs."""
    item = dataset[0]
    if loss == "kto" and "label" not in item:
        raise ValueError("loss: kto trains on unpaired examples (prompt, completion, label); set dataset._component_: "
                         "tunewright.data.preference.unpaired_preference_dataset")
    if loss != "kto" and "chosen_tokens" not in item:
        raise ValueError(f"loss: {loss} trains on pairs (prompt, chosen, rejected); set dataset._component_: "
                         "tunewright.data.preference.preference_dataset")


@torch.no_grad()
def evaluate_preference(
    objective: Callable[..., tuple[Tensor, Metrics]],
    batches: Batches,
    *,
    device: torch.device | str,
    model: torch.nn.Module,
    max_batches: int | None = None,
    kl: Tensor | None = None,
) -> dict[str, Tensor]:
    """Held-out `loss` (mean over pairs) and the `LOGGED` metrics over `batches` from their
    start (at most `max_batches`) and all data-parallel ranks, the model in eval mode meanwhile.
    `objective(batch, kl)` is the recipe's; KTO uses the last training step's `kl`."""
    was_training = model.training
    model.eval()
    sums = MetricSums(device)
    for batch in itertools.islice(batches.first_epoch(), max_batches):
        losses, values = objective(to_device(batch, device), kl)
        sums.add({"loss": losses, **values})
    model.train(was_training)
    return sums.means(("loss", *LOGGED))
