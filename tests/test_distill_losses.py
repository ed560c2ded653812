"""Distillation divergences (`training/distill.py`): 0 when student = teacher, the definitions on
small distributions, TRL's `generalized_jsd_loss` for β in {0, 0.5, 1}, chunked = whole."""

from __future__ import annotations

import math

import pytest
import torch

from tunewright.training.distill import KINDS, chunked_divergence, divergence


def _logits(seed: int, n: int = 6, vocab: int = 11) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("kind", KINDS)
def test_every_divergence_is_zero_when_student_is_teacher(kind):
    logits = _logits(0)
    assert divergence(logits, logits.clone(), kind=kind).abs().max().item() < 1e-6
    assert divergence(_logits(1), logits, kind=kind).min().item() > 1e-3  # and positive otherwise


def test_the_definitions_on_two_token_distributions():
    # p_T = (0.5, 0.5), p_S = (0.25, 0.75): hand-computed KLs.
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert divergence(student, teacher, kind="forward_kl").item() == pytest.approx(fwd, abs=1e-6)
    assert divergence(student, teacher, kind="reverse_kl").item() == pytest.approx(rev, abs=1e-6)
    assert divergence(student, teacher, kind="symmetric_kl").item() == pytest.approx((fwd + rev) / 2, abs=1e-6)
    # torchtune's "forward KL" (cross-entropy) would give fwd + H(p_T) = fwd + ln 2.
    m = [0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.5 + 0.5 * 0.75]
    jsd = 0.5 * sum(t * math.log(t / mi) for t, mi in zip([0.5, 0.5], m)) + \
        0.5 * sum(s * math.log(s / mi) for s, mi in zip([0.25, 0.75], m))
    assert divergence(student, teacher, kind="generalized_jsd", beta=0.5).item() == pytest.approx(jsd, abs=1e-6)


def test_temperature_divides_both_logits():
    s, t = _logits(2), _logits(3)
    assert torch.allclose(divergence(s, t, kind="reverse_kl", temperature=2.0), divergence(s / 2, t / 2, kind="reverse_kl"))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_equals_trl(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    student = _logits(4)[None].requires_grad_()
    teacher = _logits(5)[None]
    labels = torch.tensor([[1, -100, 3, 4, -100, 5]])
    want = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                               temperature=temperature, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, student)
    mine = student.detach().clone().requires_grad_()
    keep = labels[0] != -100
    got = divergence(mine[0][keep], teacher[0][keep], kind="generalized_jsd", beta=beta,
                     temperature=temperature).sum()
    got.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(mine.grad, want_grad, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_whole_values_and_gradients(kind):
    g = torch.Generator().manual_seed(6)
    head_s = torch.nn.Linear(8, 13, bias=False)
    head_t = torch.nn.Linear(5, 13, bias=False)
    hs = torch.randn(10, 8, generator=g, requires_grad=True)
    ht = torch.randn(10, 5, generator=g)
    whole = divergence(head_s(hs), head_t(ht).detach(), kind=kind, beta=0.3).sum()
    grads = torch.autograd.grad(whole, [hs, head_s.weight])
    chunked = chunked_divergence(hs, head_s, ht, head_t, kind=kind, beta=0.3, chunk_size=3)
    chunk_grads = torch.autograd.grad(chunked, [hs, head_s.weight])
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    for a, b in zip(grads, chunk_grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert head_t.weight.grad is None  # the teacher never gets a gradient


def test_bad_arguments_are_value_errors():
    s, t = _logits(0), _logits(1)
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        divergence(s, t, kind="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        divergence(s, t, kind="generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="same tokens"):
        chunked_divergence(torch.zeros(3, 2), lambda h: h, torch.zeros(4, 2), lambda h: h)
