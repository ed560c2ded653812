"""Activation memory of a training micro-batch, measured on the meta device; the loss's
chunk buffers and the KV cache of generation, by formula.

Saved activations are what autograd keeps from forward for backward. Rather than a formula per
family that drifts from the code, the model's own forward runs on meta tensors (no memory, no
compute) under `saved_tensors_hooks`, and the bytes of every distinct storage it saves are added
up, per block. One substitution: on meta tensors `scaled_dot_product_attention` dispatches to
its math form, which keeps the [heads, s, s] probabilities; the fused kernels a real run gets
(flash on CPU and GPU) keep q, k, v, the output and an fp32 log-sum-exp per query, so that is
what the probe's SDPA saves. On a CPU this matches a real forward's count within a few percent;
GPU kernels (grouped-query without expanded k/v) keep somewhat less, so GPU figures lean high.

Mixture-of-experts blocks route tokens with data-dependent shapes, which meta tensors cannot
run; their MLP is measured as a dense MLP as wide as the experts a token visits, plus the
dispatched copies of the tokens (an approximation, said in the table).
"""

from __future__ import annotations

import unittest.mock
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.models.args import ModelArgs


@dataclass
class Activations:
    per_layer: list[int]  # bytes saved by each block, no checkpointing
    outside: int  # embeddings, final norm: saved outside the blocks
    block_input: int  # bytes of one block's input (what a checkpointed block keeps)
    approximate: bool  # MoE blocks measured as dense

    def total(self, *, checkpointing: bool = False, every: int = 1) -> int:
        """Peak saved bytes: every block's, or with activation checkpointing of every
        `every`-th block, those blocks' inputs plus one block recomputed in backward."""
        if not checkpointing:
            return self.outside + sum(self.per_layer)
        kept = [self.block_input if i % every == 0 else n for i, n in enumerate(self.per_layer)]
        recomputed = max((n for i, n in enumerate(self.per_layer) if i % every == 0), default=0)
        return self.outside + sum(kept) + recomputed


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel saves for backward, with no computation: q, k, v, the output
    and the fp32 log-sum-exp of each query."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - the probe never runs backward
        raise NotImplementedError


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


def _dense_probe(model: nn.Module, args: ModelArgs) -> bool:
    """Swap every MoE block's MLP of the (meta) `model` for a dense one as wide as the experts
    each token goes through; returns whether any was swapped."""
    from tunewright.models.builder import activation
    from tunewright.modules.mlp import GatedMLP
    from tunewright.modules.moe import MoE

    width = (args.expert_dim or args.intermediate_dim) * max(args.experts_per_token, 1)
    width += args.shared_expert_dim or 0
    swapped = False
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            dtype = layer.mlp_norm.weight.dtype
            with torch.device("meta"):
                layer.mlp = GatedMLP(gate_proj=nn.Linear(args.dim, width, bias=False, dtype=dtype),
                                     up_proj=nn.Linear(args.dim, width, bias=False, dtype=dtype),
                                     down_proj=nn.Linear(width, args.dim, bias=False, dtype=dtype),
                                     activation=activation(args.activation))
            swapped = True
    return swapped


def measure(model: nn.Module, args: ModelArgs, *, rows: int, seq_len: int, padding_free: bool,
            dtype: torch.dtype) -> Activations:
    """Saved-for-backward bytes of one forward of `model` (built on meta; changed in place) on
    `rows` x `seq_len` tokens, laid out padding-free ([1, rows * seq_len], per-row attention)
    or as a padded batch, computing in `dtype`."""
    model.to(dtype)
    approximate = _dense_probe(model, args)
    # Blocks of the same structure save the same bytes: one of each kind runs (80 blocks of a
    # 70B model cost 80x the hooks and dispatch for nothing new).
    layers = list(model.layers)
    kinds = [(repr(layer), getattr(layer.attn, "sliding_window", None)) for layer in layers]
    firsts = {kind: i for i, kind in reversed(list(enumerate(kinds)))}
    probe = sorted(firsts.values())
    measured = dict.fromkeys(probe, 0)
    layer_of = {id(layers[i]): i for i in probe}
    seen: set[int] = set()
    current = [-1]  # the block running now; -1 outside the blocks
    outside = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t  # weights are counted once, as parameters
        storage = t.untyped_storage()
        if storage._cdata not in seen:  # one storage saved by several ops counts once
            seen.add(storage._cdata)
            if current[0] < 0:
                outside[0] += storage.nbytes()
            else:
                measured[current[0]] += storage.nbytes()
        return t

    def enter(module: nn.Module, _inputs: object) -> None:
        current[0] = layer_of[id(module)]

    def leave(_module: nn.Module, _inputs: object, _output: object) -> None:
        current[0] = -1

    hooks = [h for i in probe for h in (layers[i].register_forward_pre_hook(enter),
                                        layers[i].register_forward_hook(leave))]
    model.layers = nn.ModuleList([layers[i] for i in probe])
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                unittest.mock.patch.object(F, "scaled_dot_product_attention", _fused_sdpa):
            if padding_free:
                tokens = torch.zeros((1, rows * seq_len), dtype=torch.long, device="meta")
                model(tokens, seq_lens=[seq_len] * rows, hidden_only=True)
            else:
                tokens = torch.zeros((rows, seq_len), dtype=torch.long, device="meta")
                model(tokens, hidden_only=True)
    finally:
        model.layers = nn.ModuleList(layers)
        for h in hooks:
            h.remove()
    per_layer = [measured[firsts[kind]] for kind in kinds]
    tokens_total = rows * seq_len
    if approximate:  # the dispatched copies of each token (one per expert it visits) and router scores
        for i, layer in enumerate(model.layers):
            if args.is_moe_layer(i):
                per_layer[i] += tokens_total * (args.experts_per_token * args.dim * dtype.itemsize
                                                + args.num_experts * 4)
    return Activations(per_layer, outside[0], tokens_total * args.dim * dtype.itemsize, approximate)


def loss_bytes(args: ModelArgs, *, tokens: int, chunk_size: int, dtype: torch.dtype, head_trains: bool) -> int:
    """The chunked loss's buffers at their peak (`modules/loss.py` LinearCrossEntropy): one
    chunk of fp32 logits and its softmax (plus a copy in `dtype` below fp32), the gradient of
    the hidden states of every target, and, when the head trains, its fp32 gradient, which the
    loss holds until backward. Every token is taken to be a target (the upper bound)."""
    vocab = args.num_labels or args.vocab_size
    chunk = min(chunk_size, tokens)
    logits = chunk * vocab * (4 + 4 + (dtype.itemsize if dtype != torch.float32 else 0))
    grad_h = tokens * args.dim * dtype.itemsize
    grad_w = vocab * args.dim * 4 if head_trains else 0
    return logits + grad_h + grad_w


def kv_cache_bytes(args: ModelArgs, *, rows: int, length: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for `rows` sequences of `length` positions
    (`modules/kv_cache.py`: preallocated to the full length)."""
    return 2 * args.num_layers * rows * length * args.num_kv_heads * args.resolved_head_dim * dtype.itemsize
