"""The loop's mechanics (`training/batching.py`, `optim.py`, `objectives.py`): accumulation
equals a larger batch; padding-free and packed batches keep the maths; a transform keeps it."""

from __future__ import annotations

import copy

import pytest
import torch

from tunewright.data.collate import collate_padded
from tunewright.data.sampler import ResumableSampler
from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.training.batching import Batches, StepBatches, target_count
from tunewright.training.objectives import causal_lm_loss
from tunewright.training.optim import optimizer_step
from tunewright.training.transforms import apply_activation_checkpointing

ARGS = ModelArgs(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=64)


def tiny_model() -> torch.nn.Module:
    model = build_model(ARGS, device="cpu")
    init_weights(model, seed=0)
    return model


def items(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        tokens = torch.randint(1, 64, (n,), generator=g).tolist()
        labels = tokens[1:] + [-100]
        labels[: n // 3] = [-100] * (n // 3)  # an unequal number of targets per row
        out.append({"tokens": tokens, "labels": labels})
    return out


def run_one_step(data: list[dict], *, batch_size: int, accum: int) -> torch.nn.Module:
    """One optimizer step as a recipe's loop takes it: each micro-batch's summed loss divided by
    the targets of the whole step."""
    model = tiny_model()
    sampler = ResumableSampler(len(data), shuffle=False)
    steps = StepBatches(Batches(data, sampler, batch_size, lambda b: collate_padded(b, pad_id=0)),
                        gradient_accumulation_steps=accum, max_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    micro_batches = steps.next()
    num_targets = target_count(micro_batches, device="cpu")
    loss_sum = 0.0
    for batch in micro_batches:
        loss, _ = causal_lm_loss(model, batch)
        (loss / num_targets).backward()
        loss_sum += loss.item()
    optimizer_step(optimizer)
    model.last_loss = loss_sum / num_targets.item()
    return model


def test_gradient_accumulation_equals_larger_batch():
    data = items([9, 17, 5, 12])  # rows of different lengths and target counts
    accumulated = run_one_step(data, batch_size=2, accum=2)
    large = run_one_step(data, batch_size=4, accum=1)
    assert accumulated.last_loss == pytest.approx(large.last_loss, abs=1e-6)
    for (name, p), q in zip(accumulated.named_parameters(), large.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    # and the step really changed the weights (SGD with lr 1)
    assert not torch.allclose(tiny_model().layers[0].attn.q_proj.weight, large.layers[0].attn.q_proj.weight)


def test_activation_checkpointing_keeps_loss_and_grads():
    data = collate_padded(items([10, 7]), pad_id=0)
    a, b = tiny_model(), tiny_model()
    apply_activation_checkpointing(b)
    la, na = causal_lm_loss(a, data)
    lb, nb = causal_lm_loss(b, data)
    (la / na).backward()
    (lb / nb).backward()
    assert torch.equal(la, lb)
    assert list(dict(a.named_parameters())) == list(dict(b.named_parameters()))  # names unchanged
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7)


@pytest.mark.parametrize("packed", [False, True])
def test_padding_free_loss_equals_padded_loss(packed):
    """Dropping padding (and cross-document attention) changes no loss value or gradient."""
    from tunewright.data.packing import PackedDataset

    data = items([9, 17, 5, 12, 3])
    if packed:
        data = [PackedDataset(data, max_seq_len=24, pad_id=0)[i] for i in range(3)]
    batch = collate_padded(data, pad_id=0)
    a, b = tiny_model(), tiny_model()
    la, na = causal_lm_loss(a, batch, padding_free=False)
    lb, nb = causal_lm_loss(b, batch, padding_free=True)
    (la / na).backward()
    (lb / nb).backward()
    assert na == nb and torch.allclose(la, lb, atol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_packed_rows_equal_separate_documents():
    """A packed row (document mask + restarted positions) gives each document the logits it
    gets alone, so packing changes speed, not the maths."""
    model = tiny_model().eval()
    d1, d2 = torch.randint(1, 64, (1, 6)), torch.randint(1, 64, (1, 9))
    packed = torch.cat([d1, d2], dim=1)
    input_pos = torch.cat([torch.arange(6), torch.arange(9)])[None]
    doc_ids = torch.tensor([[0] * 6 + [1] * 9])
    with torch.no_grad():
        got = model(packed, input_pos=input_pos, doc_ids=doc_ids)
        assert torch.allclose(got[:, :6], model(d1), atol=1e-5)
        assert torch.allclose(got[:, 6:], model(d2), atol=1e-5)


def test_70b_on_meta_device_costs_no_memory():
    from tunewright.models import find_size

    _, args = find_size("llama3_1_70b")
    model = build_model(args)  # meta by default
    n = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert n == args.num_params()
    assert 70e9 < n < 71e9  # Llama-3.1-70B has 70.55B parameters
