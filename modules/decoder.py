"""The one generic decoder every family is built from: embeddings, N blocks, norm, head.

Blocks take their parts (attention, MLP, norms) from the caller, so a family that differs passes
a different part. The output head is `None` when tied to the embeddings; `head()` applies
either, so a chunked loss can run the head on slices of the hidden states (see
`modules/loss.py`) without ever materialising full logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.modules.attend import Layout
from tunewright.modules.attention import Attention
from tunewright.modules.kv_cache import KVCache
from tunewright.modules.precision import compute_autocast
from tunewright.modules.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block; optional post-norms (Gemma-2/3 "sandwich") wrap each sub-layer output."""

    def __init__(
        self,
        *,
        attn: Attention,
        mlp: nn.Module,
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        post_attn_norm: nn.Module | None = None,
        post_mlp_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.attn_norm = attn_norm
        self.mlp_norm = mlp_norm
        self.post_attn_norm = post_attn_norm
        self.post_mlp_norm = post_mlp_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: Layout) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, layout=layout)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [b, s] -> bool mask [b, 1, s, s]: causal and within the same packed document."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def cached_mask(key_mask: torch.Tensor, cache_pos: int, s: int) -> torch.Tensor:
    """bool [b, 1, s, cache_pos + s]: queries at cache_pos.. see the real cached keys up to
    themselves. A query on a padding position sees itself only, so its (unused) row of
    attention stays finite rather than a softmax over nothing."""
    kv_len = cache_pos + s
    q = torch.arange(cache_pos, kv_len, device=key_mask.device)[:, None]
    k = torch.arange(kv_len, device=key_mask.device)[None]
    return (((k <= q) & key_mask[:, None, :kv_len]) | (k == q))[:, None]


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        layers: list[nn.Module],
        norm: nn.Module,
        output: nn.Module | None,
        rope: RotaryEmbedding,
        embed_scale: float | None = None,
        final_logit_softcap: float | None = None,
        local_rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = output  # None: tied to tok_embeddings
        self.rope = rope
        self.local_rope = local_rope  # sliding-window layers' own RoPE (Gemma-3), if any
        self.embed_scale = embed_scale
        self.final_logit_softcap = final_logit_softcap

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [..., dim] -> logits [..., vocab]."""
        if self.output is None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            logits = self.output(h)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head_weight(self) -> torch.Tensor | None:
        """The weight W when the head is exactly `h @ W.T` (tied, or a bias-free nn.Linear, no
        soft-cap), which lets the loss fuse head and cross-entropy; None otherwise."""
        if self.final_logit_softcap is not None:
            return None
        if self.output is None:
            return self.tok_embeddings.weight
        if type(self.output) is nn.Linear and self.output.bias is None:
            return self.output.weight
        return None

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache_pos: int | None = None,
        seq_lens: Sequence[int] | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache_index: tuple[torch.Tensor, torch.Tensor] | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab] (or normed hidden [b, s, dim] if hidden_only).

        input_pos [b, s]: RoPE positions (packed rows restart them per document); doc_ids
        [b, s]: packed-document ids for a block-diagonal causal mask; cache_pos: generation
        with KV caches (see `setup_caches`), the position where `tokens` start; seq_lens:
        tokens [1, T] hold independent sequences of these lengths end to end (padding-free
        training, see `training/unpad.py`), with input_pos restarting for each; key_mask
        [b, cache length]: with cache_pos, which cached positions hold real tokens (False for
        the left padding of shorter prompts in a batch, `training/rollout.py`); attn_mask
        [b | 1, 1, s, s] bool (True = attend): an explicit mask instead of causal attention, for
        layouts no other argument expresses (a prompt shared by its completions,
        `training/grpo.py`); positions come from input_pos, windows are not applied to it.
        cache_index (rows [T], positions [T]), with seq_lens: a padding-free prefill that also
        writes each token's keys and values into the KV caches at that row and position
        (prompts of different lengths, left-padded in the cache, `training/rollout.py`).
        """
        with compute_autocast(self, tokens.device):  # mixed precision: modules/precision.py
            return self._forward(tokens, input_pos, doc_ids, cache_pos, seq_lens, key_mask, hidden_only, attn_mask,
                                 cache_index)

    def _forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None, doc_ids: torch.Tensor | None,
                 cache_pos: int | None, seq_lens: Sequence[int] | None, key_mask: torch.Tensor | None,
                 hidden_only: bool, attn_mask: torch.Tensor | None = None,
                 cache_index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, s = tokens.shape
        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        if input_pos is None:
            start = cache_pos or 0
            input_pos = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        cos_sin = self.rope.cos_sin(input_pos, h.dtype)
        local_cos_sin = cos_sin if self.local_rope is None else self.local_rope.cos_sin(input_pos, h.dtype)
        layout = self.layout(tokens, doc_ids=doc_ids, cache_pos=cache_pos, seq_lens=seq_lens, key_mask=key_mask) \
            if attn_mask is None else Layout("masked", mask=attn_mask)
        layout.positions = input_pos  # chunked attention and query temperatures (Llama 4) read them
        if cache_index is not None:
            if layout.kind != "varlen":
                raise ValueError("cache_index fills KV caches from a padding-free prefill: pass seq_lens too")
            cache = self.layers[0].attn.kv_cache
            last = int(cache_index[1].max()) if cache_index[1].numel() else -1  # one read back per prefill
            if cache is not None and last >= cache.max_seq_len:
                raise ValueError(f"cache_index: position {last} exceeds the KV cache of {cache.max_seq_len}")
            layout.cache_index = cache_index
        if layout.kind in ("varlen", "batch"):
            # Every training batch has its own length (and the last one fewer rows): compiled
            # blocks trace them as symbols from the first batch on (one graph) instead of
            # specialising, then recompiling.
            dims = (0, 1) if layout.kind == "batch" else (1,)
            for t in (h, *cos_sin, *local_cos_sin):
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
            if layout.seq_ids is not None:
                torch._dynamo.maybe_mark_dynamic(layout.seq_ids, 0)
        for layer in self.layers:
            cos, sin = local_cos_sin if layer.attn.sliding_window is not None else cos_sin
            h = layer(h, cos, sin, layout=layout)
        h = self.norm(h)
        return h if hidden_only else self.head(h)

    @staticmethod
    def layout(tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None, cache_pos: int | None = None,
               seq_lens: Sequence[int] | None = None, key_mask: torch.Tensor | None = None) -> Layout:
        """How the batch's tokens are laid out for attention (`modules/attend.py`)."""
        if cache_pos is not None:
            return Layout("cached", cache_pos=cache_pos,
                          mask=None if key_mask is None else cached_mask(key_mask, cache_pos, tokens.shape[1]))
        if seq_lens is not None:
            return Layout.varlen(seq_lens, tokens.device)
        if doc_ids is not None:
            return Layout("masked", mask=document_causal_mask(doc_ids))
        return Layout("batch")

    def attention_kernels(self, kind: str = "varlen", *, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> dict[str, int]:
        """Kernel name -> number of layers that get it, for a training batch laid out as `kind`
        (`varlen` for padding-free batches, `batch` for padded ones): for the run's log."""
        from tunewright.modules.attend import kernel_for

        p = self.tok_embeddings.weight
        device = torch.device(device) if device is not None else p.device
        counts: dict[str, int] = {}
        for layer in self.layers:
            attn = layer.attn
            name = kernel_for(Layout(kind), device, dtype or p.dtype, 2, window=attn.sliding_window,
                              softcap=attn.softcap, chunk=attn.chunk_size)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Give every attention layer a KV cache (generation); `reset_caches` removes them.
        The cache holds keys in the dtype the model computes them in (bf16 under mixed
        precision, whatever the embedding's master dtype)."""
        p = self.tok_embeddings.weight
        dtype = getattr(self, "autocast_dtype", None) or p.dtype
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(
                batch_size=batch_size, max_seq_len=max_seq_len, num_kv_heads=attn.num_kv_heads,
                head_dim=attn.head_dim, dtype=dtype, device=p.device,
            )

    def select_cache_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (in this order, repeats allowed) of every layer's KV cache:
        a prompt's prefill copied to its generations, finished rows dropped."""
        for layer in self.layers:
            layer.attn.kv_cache.select(rows)

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
