"""The one attention entry point (`modules/attend.py`) against a plain reference: scores
q·kᵀ·scale (soft-capped where asked), a mask spelled out position by position (causal,
window, document, cache offset), softmax, times v, with k/v heads repeated for GQA. Every
layout and option, the kernel each picks, and a compiled padding-free step that traces once."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.utils import counters

from tunewright.modules.attend import Layout, attend, kernel_for

H, KVH, D = 6, 2, 8


def reference(q, k, v, *, seq_ids=None, q_start=0, window=None, softcap=None, scale=None, causal=True):
    """Loops over positions: nothing shared with the code under test but torch's matmul."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s, kv_len = q.shape[2], k.shape[2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = torch.zeros(s, kv_len, dtype=torch.bool)
    for i, j in itertools.product(range(s), range(kv_len)):
        qi = q_start + i
        ok = (j <= qi) if causal else True
        if window is not None:
            ok = ok and qi - j < window
        if seq_ids is not None:
            ok = ok and seq_ids[qi] == seq_ids[j]
        allowed[i, j] = ok
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v.double()).to(q.dtype)


def qkv(b: int, s: int, kv_len: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv_len = kv_len or s
    return (torch.randn(b, H, s, D, generator=g), torch.randn(b, KVH, kv_len, D, generator=g),
            torch.randn(b, KVH, kv_len, D, generator=g))


OPTIONS = [dict(), dict(window=4), dict(softcap=2.0), dict(window=3, softcap=1.5, scale=0.3)]
NAMES = ["plain", "window", "softcap", "window-softcap-scale"]


@pytest.mark.parametrize("opts", OPTIONS, ids=NAMES)
def test_padded_rows(opts):
    q, k, v = qkv(2, 11)
    got = attend(q, k, v, Layout("batch"), **opts)
    for row in range(2):
        want = reference(q[row:row + 1], k[row:row + 1], v[row:row + 1], **opts)
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", OPTIONS, ids=NAMES)
@pytest.mark.parametrize("compiling", [False, True], ids=["per-sequence", "document-mask"])
def test_padding_free_sequences_attend_only_within_themselves(opts, compiling, monkeypatch):
    lens = [5, 9, 1, 7]
    q, k, v = qkv(1, sum(lens))
    layout = Layout.varlen(lens, "cpu")
    # `torch.compiler.is_compiling()` picks the in-graph document mask; the maths must agree.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    assert kernel_for(layout, q.device, q.dtype, q.shape[2], window=opts.get("window"),
                      softcap=opts.get("softcap")).startswith("document_mask" if compiling else "per_sequence")
    got = attend(q, k, v, layout, **opts)
    seq_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).tolist()
    torch.testing.assert_close(got, reference(q, k, v, seq_ids=seq_ids, **opts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", OPTIONS, ids=NAMES)
def test_packed_rows_with_a_document_mask(opts):
    from tunewright.modules.decoder import document_causal_mask

    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1], [0, 0, 0, 0, 0, 0, 1, 1, -1, -1]])
    q, k, v = qkv(2, 10)
    got = attend(q, k, v, Layout("masked", mask=document_causal_mask(doc_ids)), **opts)
    for row in range(2):
        want = reference(q[row:row + 1], k[row:row + 1], v[row:row + 1], seq_ids=doc_ids[row].tolist(), **opts)
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", OPTIONS, ids=NAMES)
@pytest.mark.parametrize("cache_pos, s", [(0, 7), (9, 4), (12, 1)], ids=["prefill", "chunk", "decode"])
def test_cached_queries_see_the_cache(opts, cache_pos, s):
    q, k, v = qkv(3, s, kv_len=cache_pos + s)
    layout = Layout("cached", cache_pos=cache_pos)
    assert (kernel_for(layout, q.device, q.dtype, s, window=None, softcap=None) == "decode_grouped") == (s == 1)
    got = attend(q, k, v, layout, **opts)
    for row in range(3):
        want = reference(q[row:row + 1], k[row:row + 1], v[row:row + 1], q_start=cache_pos, **opts)
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)


def test_the_kernel_each_device_and_option_gets():
    cpu, cuda, bf16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    varlen, batch, cached = Layout("varlen"), Layout("batch"), Layout("cached", cache_pos=3)
    cases = [
        (varlen, cpu, fp32, None, None, "per_sequence(sdpa)"),
        (varlen, cpu, fp32, 4, 2.0, "per_sequence(manual)"),
        (batch, cpu, fp32, 4, None, "sdpa"),
        (batch, cpu, fp32, None, 2.0, "manual"),
        (varlen, cuda, bf16, 4, None, "varlen_flash"),  # FlashAttention varlen takes windows
        (varlen, cuda, bf16, None, 2.0, "flex"),  # a soft-cap it cannot
        (varlen, cuda, fp32, None, None, "flex"),  # nor fp32
        (batch, cuda, bf16, None, None, "sdpa"),
        (batch, cuda, bf16, 4, None, "flex"),
    ]
    for layout, device, dtype, window, softcap, want in cases:
        assert kernel_for(layout, device, dtype, 8, window=window, softcap=softcap) == want
    assert kernel_for(cached, cuda, bf16, 1, window=None, softcap=2.0) == "decode_grouped"


@pytest.mark.parametrize("family, graphs", [("llama", 1), ("gemma2", 2)])
def test_a_compiled_step_over_padding_free_batches_of_any_lengths_is_one_graph(family, graphs):
    from tunewright.data.collate import collate_padded
    from tunewright.models.args import ModelArgs
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model
    from tunewright.training.objectives import causal_lm_loss
    from tunewright.training.transforms import compile_blocks

    args = ModelArgs(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_dim=64)
    if family == "gemma2":  # a sliding and a full layer, soft-capped scores
        args = args.replace(family="gemma2", sliding_window=6, attn_softcap=5.0,
                            layer_types=("sliding_attention", "full_attention"))
    eager, compiled = build_model(args, device="cpu"), build_model(args, device="cpu")
    init_weights(eager, seed=0)
    init_weights(compiled, seed=0)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(compiled)
    g = torch.Generator().manual_seed(0)
    for lens in ([9, 17, 5], [12, 7, 20, 3], [30, 2], [8, 8, 8, 8, 8]):
        items = [{"tokens": torch.randint(1, 64, (n,), generator=g).tolist(),
                  "labels": torch.randint(1, 64, (n,), generator=g).tolist()} for n in lens]
        batch = collate_padded(items, pad_id=0)
        for model in (eager, compiled):
            loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
        torch.testing.assert_close(compiled.layers[0].attn.q_proj.weight.grad,
                                   eager.layers[0].attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)
    # No break, no recompile for new lengths: one graph per distinct block (Gemma-2's sliding
    # and full layers differ in their window, which the graph keeps as a constant).
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs
