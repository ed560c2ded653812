"""Chunked cross-entropy equals the plain mean cross-entropy over full logits, value and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunewright.modules.loss import chunked_cross_entropy


def test_chunked_ce_matches_full_logits_ce():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100  # masked prompt
    labels[2, 7:] = -100  # padding
    total, n = chunked_cross_entropy(hidden, labels, head, chunk_size=5)
    (total / n).backward()
    got_h, got_w = hidden.grad.clone(), head.weight.grad.clone()

    hidden.grad = None
    head.weight.grad = None
    want = F.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    want.backward()
    assert n == int((labels != -100).sum())
    assert torch.allclose(total / n, want, atol=1e-6)
    assert torch.allclose(got_h, hidden.grad, atol=1e-6)
    assert torch.allclose(got_w, head.weight.grad, atol=1e-6)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_fused_linear_ce_matches_full_logits_ce(weight_trains):
    torch.manual_seed(0)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13))
    labels[1, 9:] = -100
    total, n = chunked_cross_entropy(hidden, labels, lambda h: h @ weight.t(), chunk_size=4,
                                     head_weight=weight)
    (total / n).backward()
    got_h = hidden.grad.clone()
    got_w = weight.grad.clone() if weight_trains else None
    hidden.grad = None
    weight.grad = None
    want = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), labels.reshape(-1))
    want.backward()
    assert torch.allclose(total / n, want, atol=1e-6)
    assert torch.allclose(got_h, hidden.grad, atol=1e-6)
    if weight_trains:
        assert torch.allclose(got_w, weight.grad, atol=1e-6)


def test_all_targets_masked_gives_zero_and_still_backprops():
    head = torch.nn.Linear(4, 7)
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    total, n = chunked_cross_entropy(hidden, torch.full((1, 3), -100), head)
    total.backward()
    assert n == 0 and total.item() == 0.0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0
