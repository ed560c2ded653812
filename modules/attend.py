"""The one attention entry point: `attend(q, k, v, layout, ...)` picks a kernel for how the
batch is laid out, the layer's options and the device, so every family and generation share it.

Layouts (`Layout`, built once per forward by the decoder):
- `batch`: rows of a padded [b, s] batch, causal (padding sits at row ends, after every real
  token, so causal attention never lets a real token see it);
- `varlen`: independent sequences laid end to end in one row, [1, T] (padding-free batches and
  packed documents), described by their lengths on the host and `cu_seqlens` on the device;
- `masked`: an explicit bool mask [b | 1, 1, s, kv] (packed rows kept padded);
- `cached`: queries at `cache_pos` of a KV cache (generation: prefill and one-token decode);
  with `mask`, rows whose prompts were left-padded see only their own keys (rollouts).

Kernels (`kernel_for` says which one a layer gets; `describe` logs it):
- `sdpa`: `scaled_dot_product_attention`, causal or with a mask; GQA by SDPA's own `enable_gqa`
  on GPUs, by expanded k/v on the CPU, where that measured faster (91 vs 103 ms fwd+bwd for
  SmolLM2's 9/3 heads at 1,200 tokens, torch 2.13, 2 threads);
- `per_sequence`: varlen on the CPU, one SDPA (or `manual`) call per sequence: no FLOP across
  sequences (eager only: its Python loop over lengths would specialise a compiled graph);
- `document_mask`: varlen under `torch.compile` on the CPU: one SDPA (or `manual`) call with
  a document-causal mask built in the graph from per-token sequence ids, so one graph serves
  every set of lengths;
- `varlen_flash`: varlen on CUDA in half precision, `torch.nn.attention.varlen.varlen_attn`
  (FlashAttention on `cu_seqlens`, native GQA and sliding window, nothing materialised);
- `flex`: CUDA, what flash cannot express (soft-capped scores, fp32, windows on padded rows):
  compiled `flex_attention` with a block mask (document, causal, window) and a score_mod;
- `decode_grouped`: one query token per row against the cache: the query heads of each k/v
  group are folded into the query length, so the cache is read in place (no repeat of the
  cached prefix per token; 2.7 vs 42 ms per layer at 2,048 cached tokens, 8 rows, on the CPU);
- `manual`: soft-capped scores on the CPU (tanh between scores and softmax, which SDPA cannot
  express), causal/window/document masks applied explicitly.

Sliding windows follow Hugging Face's convention: query i sees key j when 0 <= i - j < window.
Chunked attention (Llama 4's local layers) splits each sequence into chunks of `chunk`
positions: query i sees key j <= i of its own chunk, i // chunk == j // chunk, counted from the
start of the sequence (packed documents by their own positions, `Layout.positions`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Kind = Literal["batch", "varlen", "masked", "cached"]


@dataclass
class Layout:
    kind: Kind
    seq_lens: tuple[int, ...] | None = None  # varlen, on the host
    cu_seqlens: torch.Tensor | None = None  # varlen: int32 [n + 1] on the device
    seq_ids: torch.Tensor | None = None  # varlen: int64 [T], each token's sequence, on the device
    max_seqlen: int = 0  # varlen
    mask: torch.Tensor | None = None  # masked / chunked prefill: bool [b | 1, 1, s, kv], True = attend
    cache_pos: int = 0  # cached: where the queries start
    block_masks: dict = field(default_factory=dict)  # flex: one block mask per window, per forward
    positions: torch.Tensor | None = None  # [b | 1, s] each query's position (RoPE's), set by the decoder
    # varlen prefill into KV caches: (cache rows [T], cache positions [T]) each token's keys and
    # values are also written to (rollouts prefill their prompts padding-free, `training/rollout.py`)
    cache_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def varlen(cls, seq_lens: Sequence[int], device: torch.device | str) -> "Layout":
        """Sequences of `seq_lens` (host ints) end to end; the device tensors are made from the
        host values: one copy to the device (asynchronous, from pinned memory on CUDA), never a
        read back."""
        lens = tuple(int(n) for n in seq_lens)
        total, n = sum(lens), len(lens)
        lengths = torch.tensor(lens, dtype=torch.int64)
        # seq_ids [T] then cu_seqlens [n + 1] in one host buffer; seq_ids first, so that it
        # starts at offset 0 of the device copy (a compiled graph sees the same layout each time)
        host = torch.empty(total + n + 1, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
        host[:total] = torch.repeat_interleave(torch.arange(n), lengths, output_size=total)
        host[total] = 0
        torch.cumsum(lengths, 0, out=host[total + 1:])
        both = host.to(device, non_blocking=True)
        return cls("varlen", seq_lens=lens, cu_seqlens=both[total:].to(torch.int32), seq_ids=both[:total],
                   max_seqlen=max(lens, default=0))


def kernel_for(layout: Layout, device: torch.device, dtype: torch.dtype, query_len: int, *,
               window: int | None, softcap: float | None, chunk: int | None = None) -> str:
    """The kernel `attend` runs for this layout, layer and device (see the module docstring)."""
    cuda = device.type == "cuda"
    half = dtype in (torch.bfloat16, torch.float16)
    if layout.kind == "cached":
        if query_len == 1:
            return "decode_grouped"
        return "flex" if cuda and softcap is not None else ("manual" if softcap is not None else "sdpa")
    if cuda:
        if layout.kind == "varlen" and half and softcap is None and chunk is None:
            return "varlen_flash"
        if softcap is not None or layout.kind == "varlen" or window is not None or chunk is not None:
            return "flex"
        return "sdpa"
    inner = "manual" if softcap is not None else "sdpa"
    if layout.kind == "varlen":
        return f"document_mask({inner})" if torch.compiler.is_compiling() else f"per_sequence({inner})"
    return inner


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *,
    scale: float | None = None, window: int | None = None, softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """q [b, h, s, d], k/v [b, kv_heads, kv_len, d] (kv_len > s only from a cache) -> [b, h, s, d]."""
    kernel = kernel_for(layout, q.device, q.dtype, q.shape[2], window=window, softcap=softcap, chunk=chunk)
    if kernel == "varlen_flash":
        return _varlen_flash(q, k, v, layout, scale, window)
    if kernel == "flex":
        return _flex(q, k, v, layout, scale, window, softcap, chunk)
    if kernel == "decode_grouped":
        mask = layout.mask
        if _chunk_by_position(layout, chunk):  # rows padded apart: a mask, not one slice for all
            mask, chunk = mask & _same_chunk(layout, chunk, k.shape[2]), None
        return _decode_grouped(q, k, v, scale, window, softcap, mask, chunk)
    if kernel.startswith("per_sequence"):
        lens = layout.seq_lens
        return torch.cat([
            _dense(qs, ks, vs, None, scale, window, softcap, q_start=0, chunk=chunk)
            for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))
        ], dim=2)
    return _dense(q, k, v, _mask(layout, q, k, window, chunk), scale, window, softcap, q_start=layout.cache_pos,
                  chunk=chunk)


# ---------------------------------------------------------------- masks
def causal_window_mask(
    q_start: int, s: int, kv_len: int, window: int | None, device: torch.device, chunk: int | None = None,
) -> torch.Tensor:
    """bool [s, kv_len]: query q_start+i sees key j when j <= q_start+i (and, with a window,
    q_start+i - j < window; with a chunk, both in the same chunk of positions)."""
    q = torch.arange(q_start, q_start + s, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if chunk is not None:
        mask = mask & (q // chunk == k // chunk)
    return mask


def _limited(kv_len: int, window: int | None, chunk: int | None) -> bool:
    """Whether a window or chunk hides some key from some query of a causal block this long."""
    return (window is not None and kv_len > window) or (chunk is not None and kv_len > chunk)


def _chunk_by_position(layout: Layout, chunk: int | None) -> bool:
    """Whether chunks follow the tokens' positions rather than their indices: packed documents
    (positions restart) and left-padded cached rows (each row's positions start at its first
    real token, `training/rollout.py`)."""
    if chunk is None or layout.positions is None:
        return False
    return layout.kind in ("varlen", "masked") or (layout.kind == "cached" and layout.mask is not None)


def _same_chunk(layout: Layout, chunk: int, kv_len: int) -> torch.Tensor:
    """bool [b | 1, 1, s, kv_len]: query and key in the same chunk of positions."""
    pos = layout.positions  # [b | 1, s], the queries'
    if layout.kind != "cached":
        ids = torch.div(pos, chunk, rounding_mode="floor")
        return (ids[:, :, None] == ids[:, None, :])[:, None]
    # Key j of a row holds position j - (the row's left padding), read off the last query (left
    # padding: always a real token). A query always keeps itself, so that a padding query
    # (position clamped to 0) still has a key and its row stays finite.
    index = torch.arange(kv_len, device=pos.device)
    keys = index[None] - (layout.cache_pos + pos.shape[1] - 1 - pos[:, -1:])
    q_ids, k_ids = (torch.div(t, chunk, rounding_mode="floor") for t in (pos, keys))
    same = q_ids[:, :, None] == k_ids[:, None, :]
    itself = index[None, None, :] == layout.cache_pos + torch.arange(pos.shape[1], device=pos.device)[None, :, None]
    return (same | itself)[:, None]


def _mask(layout: Layout, q: torch.Tensor, k: torch.Tensor, window: int | None,
          chunk: int | None = None) -> torch.Tensor | None:
    """The explicit mask of a layout that is not plain causal (None: plain causal)."""
    s, kv_len = q.shape[2], k.shape[2]
    by_position = _chunk_by_position(layout, chunk)
    index_chunk = None if by_position else chunk
    if layout.kind == "varlen":  # document-causal from per-token sequence ids, in the graph
        ids = layout.seq_ids
        mask = ((ids[:, None] == ids[None, :]) & causal_window_mask(0, s, kv_len, window, q.device, index_chunk))
        mask = mask[None, None]
    elif layout.mask is not None:
        mask = layout.mask
        if window is not None or index_chunk is not None:
            mask = mask & causal_window_mask(layout.cache_pos, s, kv_len, window, q.device, index_chunk)
    elif _limited(kv_len, window, chunk) or (layout.kind == "cached" and s > 1 and layout.cache_pos):
        return causal_window_mask(layout.cache_pos, s, kv_len, window, q.device, chunk)
    else:
        return None
    return mask & _same_chunk(layout, chunk, kv_len) if by_position else mask


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


# ---------------------------------------------------------------- kernels
def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None, window: int | None, softcap: float | None, *, q_start: int,
           chunk: int | None = None) -> torch.Tensor:
    """SDPA (or explicit scores with a soft-cap) on one block of queries; mask None = causal."""
    if mask is None and _limited(k.shape[2], window, chunk):
        mask = causal_window_mask(q_start, q.shape[2], k.shape[2], window, q.device, chunk)
    # Without a mask the layout is causal from position 0 (one query token is decode_grouped's):
    # a plain bool, where testing the (symbolic) length would split a compiled graph.
    causal = mask is None
    if softcap is not None:
        return _manual(q, k, v, mask, scale, softcap, causal=causal)
    if q.device.type == "cuda" or q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float | None, softcap: float | None, *, causal: bool) -> torch.Tensor:
    """Explicit scores: soft-capping sits between the scores and the softmax."""
    k, v = _expand_kv(q, k, v)
    if causal:
        mask = causal_window_mask(0, q.shape[2], k.shape[2], None, q.device)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _decode_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                    window: int | None, softcap: float | None, mask: torch.Tensor | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """One query token per row: [b, h, 1, d] -> [b, kv_heads, h / kv_heads, d] against the
    cache as it is; every cached key is visible (a window keeps the last `window` keys, a chunk
    those since the query's chunk began) unless `mask` [b, 1, 1, kv_len] hides some (rows of a
    batch with left-padded prompts)."""
    b, h, _, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    start = kv_len - window if window is not None and kv_len > window else 0
    if chunk is not None:
        start = max(start, (kv_len - 1) // chunk * chunk)
    if start:
        k, v = k[:, :, start:], v[:, :, start:]
        mask = mask[..., start:] if mask is not None else None
    grouped = q.reshape(b, kv_heads, h // kv_heads, d)
    # fp32 on the CPU: explicit scores beat SDPA's flash kernel for one query (0.55 vs 0.72 ms per
    # layer at 32 rows x 160 keys, 2 threads); in half precision SDPA keeps the scores in fp32.
    if softcap is None and not (q.device.type == "cpu" and q.dtype == torch.float32):
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
    else:
        out = _manual(grouped, k, v, mask, scale, softcap, causal=False)
    return out.reshape(b, h, 1, d)


def _varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                  scale: float | None, window: int | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))  # [1, h, T, d] -> [T, h, d]
    left = -1 if window is None else window - 1  # the window counts the query itself
    out = varlen_attn(qt, kt, vt, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                      layout.max_seqlen, scale=scale, window_size=(left, 0),
                      enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)[None]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float | None,
          window: int | None, softcap: float | None, chunk: int | None = None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    s, kv_len = q.shape[2], k.shape[2]
    key = (window, chunk, s, kv_len)
    if key not in layout.block_masks:  # made once per forward, shared by the layers
        offset = kv_len - s  # queries are the last s positions (a cache's prefill)
        seq_ids, dense = layout.seq_ids, layout.mask
        # Packed documents count chunks from their own starts (see `_mask`).
        pos = layout.positions if chunk is not None and layout.kind in ("varlen", "masked") else None

        def mask_mod(b, h, qi, ki):
            keep = ki <= qi + offset
            if window is not None:
                keep = keep & (qi + offset - ki < window)
            if chunk is not None and pos is None:
                keep = keep & ((qi + offset) // chunk == ki // chunk)
            if pos is not None:
                row = b if pos.shape[0] > 1 else 0
                keep = keep & (pos[row, qi] // chunk == pos[row, ki] // chunk)
            if seq_ids is not None:
                keep = keep & (seq_ids[qi] == seq_ids[ki])
            if dense is not None:
                keep = keep & dense[b if dense.shape[0] > 1 else 0, 0, qi, ki]
            return keep

        per_row = (dense is not None and dense.shape[0] > 1) or (pos is not None and pos.shape[0] > 1)
        rows = q.shape[0] if per_row else None
        layout.block_masks[key] = create_block_mask(mask_mod, rows, None, s, kv_len, device=q.device)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap

    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=layout.block_masks[key], scale=scale,
                            enable_gqa=q.shape[1] != k.shape[1])
