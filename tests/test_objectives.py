"""Objective pieces (`training/objectives.py`, `adapters_disabled`) against plain references:
log-probs from full logits and `log_softmax`, the base model alone, a held-out pass read twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright.data.collate import collate_padded
from tunewright.data.packing import PackedDataset
from tunewright.data.sampler import ResumableSampler
from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.modules.peft.apply import adapter_state_dict, adapters_disabled, apply_lora
from tunewright.training.batching import Batches
from tunewright.training.objectives import (causal_lm_loss, evaluate_loss, per_row_sum, sequence_logprobs,
                                            token_logprobs)

ARGS = ModelArgs(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=64)
SOFTCAP = ARGS.replace(family="gemma2", final_softcap=5.0, tie_embeddings=True)
MOE = ARGS.replace(num_experts=4, experts_per_token=2, expert_dim=48)


def tiny(args: ModelArgs = ARGS) -> nn.Module:
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    return model


def items(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(1, 64, (n,), generator=g).tolist()
        labels = tokens[1:] + [-100]
        labels[: n // 3] = [-100] * (n // 3)  # a prompt that does not count
        out.append({"tokens": tokens, "labels": labels})
    return out


def reference_logprobs(model: nn.Module, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row on its own through the full logits: log_softmax, then the label's entry."""
    logps, rows = [], []
    for row in range(batch["tokens"].shape[0]):
        n = int(batch["seq_lens"][row])
        if n == 0:
            continue
        logits = model(batch["tokens"][row : row + 1, :n])[0].float() / temperature
        labels = batch["labels"][row, :n]
        keep = labels != -100
        logps.append(F.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None]).squeeze(1))
        rows.append(torch.full((int(keep.sum()),), row))
    return torch.cat(logps), torch.cat(rows)


@pytest.mark.parametrize("args", [ARGS, SOFTCAP], ids=["linear-head", "softcapped-tied-head"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_token_logprobs_and_their_gradients_equal_full_logits(args, padding_free):
    batch = collate_padded(items([9, 17, 5, 12]), pad_id=0)
    a, b = tiny(args), tiny(args)
    got, rows = token_logprobs(a, batch, chunk_size=7, padding_free=padding_free)  # chunks cross rows
    want, want_rows = reference_logprobs(b, batch)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.linspace(-1, 1, got.numel())  # a loss that weighs every token differently
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_temperature_divides_the_logits():
    batch = collate_padded(items([8, 6]), pad_id=0)
    model = tiny()
    with torch.no_grad():
        got, _ = token_logprobs(model, batch, temperature=0.7)
        want, _ = reference_logprobs(model, batch, temperature=0.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_sum_each_row_and_count_its_targets():
    batch = collate_padded(items([9, 0, 14, 6]), pad_id=0)  # an empty row keeps its place
    model = tiny()
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch)
        want, rows = reference_logprobs(model, batch)
    assert counts.tolist() == [(batch["labels"][r] != -100).sum().item() for r in range(4)]
    expected = torch.stack([want[rows == r].sum() for r in range(4)])
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert sums[1] == 0 and counts[1] == 0


def test_the_sft_loss_is_minus_the_sum_of_target_logprobs():
    docs = items([9, 17, 5, 12, 3])
    packed = collate_padded([PackedDataset(docs, max_seq_len=24, pad_id=0)[i] for i in range(2)], pad_id=0)
    model = tiny()
    with torch.no_grad():
        loss, n = causal_lm_loss(model, packed)
        logp, _ = token_logprobs(model, packed)
    assert n == logp.numel() and torch.allclose(loss, -logp.sum(), atol=1e-4)


def test_per_row_sum_is_deterministic_and_differentiable():
    values = torch.randn(7, requires_grad=True)
    rows = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    sums = per_row_sum(values, rows, 4)
    assert torch.equal(sums.detach(), torch.stack([values[rows == r].sum() for r in range(4)]).detach())
    sums.sum().backward()
    assert torch.equal(values.grad, torch.ones(7))


# ---------------------------------------------------------------- adapters off = the base model
@pytest.mark.parametrize("args, kw", [
    (ARGS, {"targets": "all-linear"}),
    (ARGS, {"targets": ["q", "v", "output"], "use_dora": True}),
    (MOE, {"targets": ["q", "gate", "up", "down"], "experts": "per_expert"}),
], ids=["lora", "dora-and-head", "experts"])
def test_adapters_disabled_gives_exactly_the_base_model(args, kw):
    base = tiny(args).eval()
    adapted = tiny(args)
    apply_lora(adapted, rank=4, alpha=8, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in adapter_state_dict(adapted).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.2)  # adapters that really change the output
    adapted.eval()
    tokens = torch.randint(0, 64, (2, 11), generator=g)
    with torch.no_grad():
        want = base(tokens)
        on = adapted(tokens)
        with adapters_disabled(adapted):
            with adapters_disabled(adapted):  # nests
                pass
            off = adapted(tokens)
        again = adapted(tokens)
    assert torch.equal(off, want)
    assert not torch.allclose(on, want, atol=1e-3) and torch.equal(again, on)


def test_adapters_disabled_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="no adapters"):
        with adapters_disabled(tiny()):
            pass


# ---------------------------------------------------------------- held-out loss
def test_evaluate_loss_reads_the_same_batches_every_time_and_keeps_the_mode():
    data = items([9, 17, 5, 12, 7, 10])
    batches = Batches(data, ResumableSampler(len(data), shuffle=False), 2, lambda b: collate_padded(b, pad_id=0))
    model = tiny().train()
    first = evaluate_loss(model, batches, causal_lm_loss, device="cpu", max_batches=2)
    second = evaluate_loss(model, batches, causal_lm_loss, device="cpu", max_batches=2)
    assert model.training and torch.equal(first.loss, second.loss)
    with torch.no_grad():
        sums = [causal_lm_loss(model, collate_padded(data[i : i + 2], pad_id=0)) for i in (0, 2)]
    assert first.num_targets.item() == sum(n for _, n in sums)
    assert first.loss.item() == pytest.approx(sum(s.item() for s, _ in sums) / first.num_targets.item(), rel=1e-6)
