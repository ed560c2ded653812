"""Batches made on the host, ready for a GPU (issue 11): padding-free batches flattened as rows
are collated (`data/collate.py` `collate_flat`) equal the device-side flatten of the padded batch
they replace, in tokens and in losses; DataLoader workers give the same batches in the same
order and resume exactly at the batches consumed; the training step reads nothing back from the
device."""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunewright.data.collate import collate_flat, collate_padded
from tunewright.data.packing import PackedDataset
from tunewright.data.sampler import ResumableSampler
from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.modules.peft.apply import apply_lora
from tunewright.training import unpad
from tunewright.training.batching import Batches, StepBatches
from tunewright.training.data_setup import loader_options, make_batches
from tunewright.training.objectives import causal_lm_loss, hidden_states, sequence_logprobs

ARGS = ModelArgs(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=64)
KEYS = ("tokens", "labels", "input_pos", "row_ids")


def old_flatten_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The device-side flatten the training step ran before (training/unpad.py at 094c64d),
    verbatim but for the names: the reference the host collation must equal."""
    tokens, labels = batch["tokens"], batch["labels"]
    if "doc_ids" in batch:
        doc_ids = batch["doc_ids"]
        keep = doc_ids >= 0
        flat = doc_ids[keep]
        row = torch.arange(doc_ids.shape[0])[:, None].expand_as(doc_ids)[keep]
        change = torch.ones_like(flat, dtype=torch.bool)
        change[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
        starts = change.nonzero().flatten().tolist() + [flat.numel()]
        seq_lens = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = batch["seq_lens"]
        pos = torch.arange(tokens.shape[1])
        keep = pos[None, :] < torch.as_tensor(lengths)[:, None]
        seq_lens = [int(n) for n in lengths if int(n) > 0]
    input_pos = torch.cat([torch.arange(n) for n in seq_lens])
    rows = torch.arange(tokens.shape[0])[:, None].expand_as(tokens)
    return {"tokens": tokens[keep][None], "labels": labels[keep][None], "input_pos": input_pos[None],
            "row_ids": rows[keep][None], "seq_lens": seq_lens}


def random_rows(seed: int, num: int, *, empty: bool = True) -> list[dict]:
    """Rows of random lengths with 1-token rows, rows without a target and (with `empty`) a row
    of no tokens among them."""
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        n = [1, 2, rng.randint(3, 40)][i % 3]
        tokens = [rng.randint(1, 63) for _ in range(n)]
        labels = tokens[1:] + [-100]
        cut = rng.randint(0, n)
        labels[:cut] = [-100] * cut  # the prompt; cut = n: a row without a target
        rows.append({"tokens": tokens, "labels": labels})
    if empty:
        rows.insert(num // 2, {"tokens": [], "labels": []})
    return rows


def batches_of(kind: str, seed: int) -> list[list[dict]]:
    rows = random_rows(seed, 13, empty=kind == "unpacked")
    if kind == "packed":
        packed = PackedDataset(rows, max_seq_len=48, pad_id=0)
        rows = [packed[i] for i in range(len(packed))]
    return [rows[i : i + 4] for i in range(0, len(rows), 4)]


def tiny(seed: int = 0, lora: bool = False) -> torch.nn.Module:
    model = build_model(ARGS, device="cpu")
    init_weights(model, seed=seed)
    if lora:
        apply_lora(model, targets="all-linear", rank=4, alpha=8)
        with torch.no_grad():  # B = 0 at init would leave A without a gradient
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


# ---------------------------------------------------------------- flat collation


@pytest.mark.parametrize("kind", ["unpacked", "packed"])
@pytest.mark.parametrize("seed", range(4))
def test_flat_collation_equals_the_device_flatten_of_the_padded_batch(kind, seed):
    for items in batches_of(kind, seed):
        padded = collate_padded(items, pad_id=0)
        want = old_flatten_batch(padded)
        for got in (collate_flat(items, pad_id=0), unpad.flatten_batch(padded)):
            for key in KEYS:
                assert torch.equal(got[key], want[key]), key
                assert got[key].dtype == torch.long
            assert got["seq_lens"] == want["seq_lens"] and all(n > 0 for n in got["seq_lens"])
            assert got["num_rows"] == len(items)
            assert (got["num_tokens"], got["num_targets"]) == (padded["num_tokens"], padded["num_targets"])
            assert unpad.is_flat(got) and not unpad.is_flat(padded)
        if kind == "packed":  # the positions packing wrote, with the padding taken out
            keep = padded["doc_ids"] >= 0
            assert torch.equal(collate_flat(items)["input_pos"][0], padded["input_pos"][keep])


def test_flat_collation_rejects_what_padded_collation_rejects():
    with pytest.raises(ValueError, match="empty batch"):
        collate_flat([])
    with pytest.raises(ValueError, match="mixes packed and unpacked"):
        collate_flat([{"tokens": [1], "labels": [-100]},
                      {"tokens": [1], "labels": [-100], "input_pos": [0], "doc_ids": [0]}])
    with pytest.raises(ValueError, match="not as long as their tokens"):
        collate_flat([{"tokens": [1, 2], "labels": [-100]}])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding, relative to the largest entry (other kernels, other sums)."""
    return bool((a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-6)


@pytest.mark.parametrize("kind", ["unpacked", "packed"])
def test_loss_log_probs_and_gradients_equal_for_padded_host_flat_and_device_flat(kind):
    items = batches_of(kind, 7)[0]
    padded = collate_padded(items, pad_id=0)
    forms = {"padded": (padded, False), "device_flat": (padded, True),
             "old_flat": ({**old_flatten_batch(padded), "num_rows": len(items)}, True),
             "host_flat": (collate_flat(items, pad_id=0), True)}
    results = {}
    for name, (batch, padding_free) in forms.items():
        model = tiny()
        loss, n = causal_lm_loss(model, batch, padding_free=padding_free, chunk_size=16)
        sums, counts = sequence_logprobs(model, batch, padding_free=padding_free, chunk_size=16)
        (loss + sums.square().sum()).backward()
        results[name] = (loss, n, sums, counts, [p.grad.clone() for p in model.parameters()])
    want = results["old_flat"]
    assert want[3].tolist() == [sum(t != -100 for t in item["labels"]) for item in items]  # per row, 0s kept
    for name, (loss, n, sums, counts, grads) in results.items():
        exact = name != "padded"  # the same tokens in the same order: the same bits
        check = torch.equal if exact else close
        assert n == want[1] and torch.equal(counts, want[3]), name
        assert check(loss, want[0]) and check(sums, want[2]), name
        assert all(check(g, w) for g, w in zip(grads, want[4])), name


# ---------------------------------------------------------------- workers and resume


def row_batches(num_workers: int, *, num_rows: int = 23, batch_size: int = 3, **sampler: Any) -> Batches:
    """Batches whose tokens name their rows (row i is [i] * (i % 5 + 1))."""
    data = [{"tokens": [i] * (i % 5 + 1), "labels": [-100] * (i % 5) + [i]} for i in range(num_rows)]
    return Batches(data, ResumableSampler(num_rows, seed=3, **sampler), batch_size,
                   collate_flat, num_workers=num_workers)


def steps(data: StepBatches, n: int) -> list[list[int]]:
    """The rows of the micro-batches of the next `n` steps."""
    return [sorted(set().union(*(set(b["tokens"][0].tolist()) for b in data.next()))) for _ in range(n)]


SETUPS = {"epochs": dict(gradient_accumulation_steps=2, epochs=2),  # a short last step per epoch
          "cut": dict(gradient_accumulation_steps=1, epochs=3, max_steps_per_epoch=3)}  # epochs cut short


@pytest.mark.parametrize("setup", SETUPS)
def test_workers_give_the_batches_and_positions_of_the_main_thread(setup):
    plain, workers = StepBatches(row_batches(0), **SETUPS[setup]), StepBatches(row_batches(2), **SETUPS[setup])
    for _ in range(plain.total_steps):
        a, b = plain.next(), workers.next()
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in KEYS)
            assert x["seq_lens"] == y["seq_lens"]
        # the position saved is that of the rows consumed, though workers have read ahead
        assert workers.state_dict() == plain.state_dict()


@pytest.mark.parametrize("setup", SETUPS)
def test_stopped_at_every_step_and_resumed_with_workers_gives_the_uninterrupted_order(setup):
    whole = StepBatches(row_batches(0), **SETUPS[setup])
    want = steps(whole, whole.total_steps)
    for k in range(whole.total_steps + 1):
        first = StepBatches(row_batches(2), **SETUPS[setup])
        got = steps(first, k)
        state = copy.deepcopy(first.state_dict())
        del first  # its workers go with it, as with a process that stopped
        resumed = StepBatches(row_batches(2), **SETUPS[setup])
        resumed.load_state_dict(state)
        got += steps(resumed, whole.total_steps - k)
        assert got == want, k


def test_held_out_batches_with_workers_read_the_same_rows_and_leave_the_position():
    batches = row_batches(2, shuffle=False)
    data = StepBatches(batches, epochs=2)
    steps(data, 2)
    before = data.state_dict()
    passes = [[b["tokens"][0].tolist() for b in batches.first_epoch()] for _ in range(2)]
    assert passes[0] == passes[1] == [sum(([i] * (i % 5 + 1) for i in range(s, min(s + 3, 23))), [])
                                      for s in range(0, 23, 3)]
    assert data.state_dict() == before


def test_workers_only_when_asked_and_by_default_only_on_cuda():
    assert make_batches([{"tokens": [1], "labels": [-100]}], pad_id=0, batch_size=1).num_workers == 0

    class Cfg:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    assert loader_options(Cfg(device="cpu", num_workers=None, pin_memory=None)) == {"num_workers": 0,
                                                                                    "pin_memory": False}
    assert loader_options(Cfg(device="cuda:1", num_workers=None, pin_memory=None)) == {"num_workers": 2,
                                                                                       "pin_memory": True}
    assert loader_options(Cfg(device="cuda", num_workers=0, pin_memory=False)) == {"num_workers": 0,
                                                                                   "pin_memory": False}


# ---------------------------------------------------------------- no read-back in the hot path


class ReadBack(TorchDispatchMode):
    """Fails on every op whose result needs values read back from the tensors: on a GPU, a sync
    of the host with the device (`.item()`/`.tolist()`, `nonzero`, boolean indexing, a
    `repeat_interleave` of unknown size, ...)."""

    SYNCING = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::unique_consecutive",
               "aten::_unique2", "aten::unique_dim", "aten::nonzero_static", "aten::is_nonzero"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") \
            and any(t is not None and t.dtype == torch.bool for t in args[1])
        unsized = name == "aten::repeat_interleave" and kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
        if name in self.SYNCING or bool_index or unsized:
            raise AssertionError(f"{func} reads values back from the device")
        return func(*args, **kwargs)


@contextmanager
def no_python_read_back(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`.tolist()`, `.item()`, `.nonzero()` and the device-side flatten raise inside."""
    with monkeypatch.context() as m:
        for name in ("tolist", "item", "nonzero"):
            m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in the step"))
        m.setattr(unpad, "flatten_batch", lambda *a, **k: pytest.fail("flatten_batch in the step"))
        yield


@pytest.mark.parametrize("kind", ["unpacked", "packed"])
def test_a_lora_training_step_on_a_host_flat_batch_reads_nothing_back(kind, monkeypatch):
    items = batches_of(kind, 3)[0]
    flat = next(iter(make_batches(items, pad_id=0, batch_size=len(items), shuffle=False, padding_free=True)))
    padded = collate_padded(items, pad_id=0)
    model = tiny(lora=True)
    with no_python_read_back(monkeypatch):
        loss, _ = causal_lm_loss(model, flat)  # forward, loss, backward, as the recipe's step
        loss.backward()
        with pytest.raises(BaseException, match="flatten_batch|Tensor.nonzero"):  # the guard bites
            causal_lm_loss(model, padded)
    # Stricter, at the level of torch ops (boolean indexing included): the whole step, the loss
    # picking its targets by the host-made `target_index`, and the per-row log-probs of DPO/GRPO.
    with ReadBack():
        loss, _ = causal_lm_loss(model, flat)
        loss.backward()
        sums, _ = sequence_logprobs(model, flat)
        sums.sum().backward()
    with pytest.raises(AssertionError, match="reads values back"), ReadBack():
        hidden_states(model, padded)  # the padded batch flattened on the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's own sync detector")
def test_on_cuda_batches_come_pinned_and_the_decoder_step_never_syncs():
    from tunewright.training.batching import to_device

    items = batches_of("packed", 5)[0]
    batch = next(iter(make_batches(items, pad_id=0, batch_size=len(items), shuffle=False, padding_free=True,
                                   num_workers=2, pin_memory=True)))
    assert all(batch[k].is_pinned() for k in KEYS)
    model = tiny(lora=True).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden, _, _ = hidden_states(model, to_device(batch, "cuda"))
        hidden.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
