"""Preference losses (training/preference.py) against their formulas at fixed points and against
TRL's own code on random log-probs: TRL's trainer methods run with a minimal stand-in `self`
(and, for DPO and KTO, a stand-in model whose per-token log-probs sum to the given sequence
log-probs), so nothing of TRL's maths is re-typed here."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunewright.training import preference as P

pytest.importorskip("trl")

B = 6


def _seq(seed: int, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(n, generator=g, dtype=torch.float64) * 30 - 1)


def _lengths(seed: int, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 12, (n,), generator=g).double()


# ---------------------------------------------------------------- fixed points
def test_values_at_policy_equal_reference() -> None:
    logps, counts = _seq(0), _lengths(1)
    beta = 0.25
    dpo, _ = P.dpo(logps, logps - 3, logps, logps - 3, beta=beta)
    torch.testing.assert_close(dpo, torch.full_like(logps, math.log(2)), rtol=0, atol=1e-12)
    ipo, _ = P.ipo(logps, logps - 3, logps, logps - 3, counts, counts + 2, beta=beta)
    torch.testing.assert_close(ipo, torch.full_like(logps, (1 / (2 * beta)) ** 2), rtol=0, atol=1e-12)
    hinge, _ = P.hinge(logps, logps - 3, logps, logps - 3, beta=beta)
    torch.testing.assert_close(hinge, torch.ones_like(logps), rtol=0, atol=0)
    gamma = 0.7  # equal MEAN log-probs: answers of different lengths, the same per-token log-prob
    simpo, _ = P.simpo(-0.5 * counts, -0.5 * (counts + 3), counts, counts + 3, beta=2.0, gamma=gamma)
    expected = -math.log(1 / (1 + math.exp(gamma)))  # -log σ(-γ)
    torch.testing.assert_close(simpo, torch.full_like(logps, expected), rtol=0, atol=1e-12)


def test_kto_kl_is_clamped_at_zero_and_detached() -> None:
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    below = P.kto_kl((policy - torch.tensor([-1.0, -2.0])).sum(), torch.tensor(2.0))
    assert below.item() == 0.0 and not below.requires_grad
    above = P.kto_kl((policy - torch.tensor([-9.0, -9.0])).sum(), torch.tensor(2.0))
    assert above.item() == pytest.approx(3.5) and not above.requires_grad


# ---------------------------------------------------------------- TRL's DPOTrainer
class _FakeModel:
    """What DPOTrainer/KTOTrainer read from a model's output: per-token log-probs [b, s-1]
    (placed so they sum to the given sequence log-probs), entropy, mean logits, top-1."""

    def __init__(self, outputs: dict[int, torch.Tensor]) -> None:
        self.outputs = outputs  # id(input_ids) -> per-token log-probs
        self.training = True

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        logps = self.outputs[id(input_ids)]
        zeros = torch.zeros_like(logps.detach())
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _per_token(seq_logps: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_mask [b, width+1] with `counts` answer tokens after one prompt token,
    per-token log-probs [b, width] summing to `seq_logps`, differentiable in it)."""
    pos = torch.arange(width + 1)[None, :]
    mask = ((pos >= 1) & (pos <= counts[:, None])).long()
    per_token = seq_logps[:, None] / counts[:, None] * mask[:, 1:]
    return mask, per_token


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           unwrap_model=lambda m: m)


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, chosen: torch.Tensor, rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, chosen_counts: torch.Tensor,
             rejected_counts: torch.Tensor, loss_weights: tuple[float, ...] = (1.0,),
             extra_losses: tuple[str, ...] = ()) -> torch.Tensor:
    from trl.trainer.dpo_trainer import DPOTrainer

    width = int(max(chosen_counts.max(), rejected_counts.max())) + 1
    mask, per_token = _per_token(torch.cat([chosen, rejected]), torch.cat([chosen_counts, rejected_counts]), width)
    input_ids = torch.zeros_like(mask)
    model = _FakeModel({id(input_ids): per_token})
    fake = SimpleNamespace(
        model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type, *extra_losses], loss_weights=list(loss_weights), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)


def _leaves(*seeds: int) -> list[torch.Tensor]:
    return [_seq(s).requires_grad_() for s in seeds]


def _check(ours: torch.Tensor, theirs: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """Loss and gradient wrt every policy log-prob equal to 1e-6."""
    ours_grads = torch.autograd.grad(ours, leaves)
    theirs_grads = torch.autograd.grad(theirs, leaves)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=1e-6)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                      ("hinge", 0.1, 0.0), ("hinge", 0.05, 0.0),
                                                      ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
                                                      ("robust", 0.1, 0.2)])
def test_reference_losses_equal_trl(loss_type: str, beta: float, smoothing: float) -> None:
    chosen, rejected = _leaves(10, 11)
    ref_chosen, ref_rejected = _seq(12), _seq(13)
    counts_c, counts_r = _lengths(14), _lengths(15)
    theirs = _trl_dpo(loss_type, beta, smoothing, chosen, rejected, ref_chosen, ref_rejected, counts_c, counts_r)
    if loss_type == "ipo":
        losses, metrics = P.ipo(chosen, rejected, ref_chosen, ref_rejected, counts_c, counts_r, beta=beta)
    elif loss_type == "hinge":
        losses, metrics = P.hinge(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    else:
        losses, metrics = P.dpo(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                label_smoothing=smoothing, robust=loss_type == "robust")
    _check(losses.mean(), theirs, [chosen, rejected])
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (chosen - ref_chosen).detach())
    torch.testing.assert_close(metrics["accuracy"], (chosen - ref_chosen > rejected - ref_rejected).double())


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_rpo_term_equals_trl_sigmoid_plus_sft(alpha: float) -> None:
    # TRL's `sft` averages over all chosen tokens of the batch, ours per pair: equal when every
    # chosen answer has the same length (the rejected ones need not).
    from tunewright.recipes.dpo import Config, pair_losses

    chosen, rejected = _leaves(20, 21)
    ref_chosen, ref_rejected = _seq(22), _seq(23)
    counts_c, counts_r = torch.full((B,), 7.0, dtype=torch.float64), _lengths(24)
    theirs = _trl_dpo("sigmoid", 0.1, 0.0, chosen, rejected, ref_chosen, ref_rejected, counts_c, counts_r,
                      loss_weights=(1.0, alpha), extra_losses=("sft",))
    cfg = SimpleNamespace(loss="dpo", beta=0.1, label_smoothing=0.0, robust=False, rpo_alpha=alpha)
    ours, _ = pair_losses(cfg, torch.cat([chosen, rejected]), torch.cat([counts_c, counts_r]),
                          torch.cat([ref_chosen, ref_rejected]), {"num_pairs": B}, None)
    _check(ours.mean(), theirs, [chosen, rejected])
    assert Config.__dataclass_fields__["rpo_alpha"].default == 0.0  # off unless asked for
    plain, _ = pair_losses(SimpleNamespace(**{**vars(cfg), "rpo_alpha": 0.0}), torch.cat([chosen, rejected]),
                           torch.cat([counts_c, counts_r]), torch.cat([ref_chosen, ref_rejected]),
                           {"num_pairs": B}, None)
    assert (ours - plain).detach().abs().min() > 0.1  # the term is there, per pair


def _cpo(loss_type: str, beta: float, smoothing: float, **extra: float) -> SimpleNamespace:
    return SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                           accelerator=_accelerator(), **extra)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cdpo_equals_trl_sigmoid_with_label_smoothing(smoothing: float) -> None:
    # TRL's CPO `sigmoid` loss is cDPO's formula on its two inputs; given the log-RATIOS it is cDPO.
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected = _leaves(20, 21)
    ref_chosen, ref_rejected = _seq(22), _seq(23)
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo("sigmoid", 0.2, smoothing), chosen - ref_chosen, rejected - ref_rejected)
    losses, _ = P.dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.2, label_smoothing=smoothing)
    _check(losses.mean(), theirs.mean(), [chosen, rejected])


@pytest.mark.parametrize("beta,gamma,smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.1)])
def test_simpo_equals_trl(beta: float, gamma: float, smoothing: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected = _leaves(30, 31)
    counts_c, counts_r = _lengths(32), _lengths(33)
    # CPO computes SimPO on length-averaged log-probs (average_log_prob for loss_type simpo)
    theirs, rewards_c, _ = CPOTrainer.cpo_loss(_cpo("simpo", beta, smoothing, simpo_gamma=gamma),
                                               chosen / counts_c, rejected / counts_r)
    losses, metrics = P.simpo(chosen, rejected, counts_c, counts_r, beta=beta, gamma=gamma,
                              label_smoothing=smoothing)
    _check(losses.mean(), theirs.mean(), [chosen, rejected])
    torch.testing.assert_close(metrics["rewards/chosen"], rewards_c)


def test_orpo_equals_trl_odds_ratio_plus_the_papers_nll() -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected = [(_seq(s) / 10).requires_grad_() for s in (40, 41)]  # mean log-probs both sides of -ln 2
    counts_c, counts_r = _lengths(42), _lengths(43)
    fake = SimpleNamespace(beta=0.25, accelerator=_accelerator())
    or_losses, rewards_c, _, _, _ = ORPOTrainer.odds_ratio_loss(fake, chosen / counts_c, rejected / counts_r)
    # TRL: loss = nll - losses.mean(); the NLL is the paper's per-answer mean here
    theirs = (-(chosen / counts_c)).mean() - or_losses.mean()
    losses, metrics = P.orpo(chosen, rejected, counts_c, counts_r, beta=0.25)
    _check(losses.mean(), theirs, [chosen, rejected])
    torch.testing.assert_close(metrics["rewards/chosen"], rewards_c.double())


# ---------------------------------------------------------------- TRL's KTOTrainer
@pytest.mark.parametrize("weights,kl_shift", [((1.0, 1.0), 2.0), ((1.0, 1.33), 2.0), ((0.8, 1.0), -3.0)])
def test_kto_equals_trl(weights: tuple[float, float], kl_shift: float) -> None:
    from trl.trainer.kto_trainer import KTOTrainer

    n = 8
    logps = _seq(50, n).requires_grad_()
    ref_logps = _seq(51, n)
    kl_policy = _seq(52, n)
    ref_kl = kl_policy - kl_shift + _seq(53, n) / 30  # mean log-ratio about kl_shift: clamped when < 0
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    counts, kl_counts = _lengths(54, n), _lengths(55, n)
    width = int(max(counts.max(), kl_counts.max())) + 1
    mask, per_token = _per_token(logps, counts, width)
    kl_mask, kl_per_token = _per_token(kl_policy, kl_counts, width)
    input_ids, kl_ids = torch.zeros_like(mask), torch.zeros_like(kl_mask)
    model = _FakeModel({id(input_ids): per_token, id(kl_ids): kl_per_token})
    fake = SimpleNamespace(
        model=model, accelerator=_accelerator(), calculate_KL=True, aux_loss_enabled=False,
        precompute_ref_logps=True, loss_type="kto", beta=0.1, desirable_weight=weights[0],
        undesirable_weight=weights[1], _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    fake._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake, m, b)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
              "label": desirable.long(), "ref_logps": ref_logps, "ref_KL_logps": ref_kl}
    theirs = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)

    kl = P.kto_kl((kl_policy - ref_kl).sum(), torch.tensor(float(n)))
    assert (kl.item() == 0.0) == (kl_shift < 0)
    torch.testing.assert_close(kl, torch.tensor(fake._metrics["train"]["kl"][0], dtype=kl.dtype).clamp(min=0),
                               rtol=0, atol=1e-6)
    losses, metrics = P.kto(logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=weights[0],
                            undesirable_weight=weights[1])
    _check(losses.mean(), theirs, [logps])
    assert metrics["rewards/chosen"].numel() == int(desirable.sum())


def test_metric_sums_average_over_micro_batches() -> None:
    sums = P.MetricSums("cpu")
    a, b = _seq(60, 4), _seq(61, 2)
    sums.add({"x": a})
    sums.add({"x": b})
    means = sums.means(["x", "absent"])
    torch.testing.assert_close(means["x"], torch.cat([a, b]).mean())
    assert "absent" not in means
