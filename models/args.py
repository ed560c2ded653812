"""`ModelArgs`: the shape and options of a decoder. A model size is one of these, a row.

The options beyond Llama's are the data that tells families apart; the builder reads them and
swaps the part they name (see `models/builder.py`). Defaults are Llama's, so a row only lists
what differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"  # HF `layer_types` values


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    head_dim: int | None = None  # None: dim // num_heads
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False
    attn_out_bias: bool | None = None  # o_proj bias; None: as attn_bias (Qwen2: q/k/v only)
    # --- attention variants ---
    qk_norm: bool = False  # RMSNorm on each q/k head before RoPE (Qwen3, Gemma-3), not on NoPE layers
    qk_norm_weight: bool = True  # False: those norms have no learned weight (Llama 4)
    sliding_window: int | None = None  # keys within this many positions (incl. itself)
    layer_types: tuple[str, ...] | None = None  # per layer FULL or SLIDING; None: all FULL
    local_rope_base: float | None = None  # RoPE base of sliding layers (Gemma-3), unscaled
    rotary_dim: int | None = None  # partial rotary: RoPE on the first rotary_dim of a head
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None  # tanh soft-cap of attention scores (Gemma-2)
    attn_chunk_size: int | None = None  # CHUNKED layers: keys only in the query's chunk (Llama 4)
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (Llama 4's global layers)
    rope_interleaved: bool = False  # RoPE on adjacent pairs (Meta's complex form), not on halves
    # NoPE layers' query temperature (floor_scale, scale), see modules/attention.py's LogTemperature
    attn_temperature: tuple[float, float] | None = None
    # --- block and head variants ---
    activation: str = "silu"  # gated-MLP activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + weight) RMSNorm
    sandwich_norms: bool = False  # extra norms on attention and MLP outputs (Gemma-2/3)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(dim))
    final_softcap: float | None = None  # tanh soft-cap of the logits (Gemma-2)
    # --- mixture of experts (num_experts == 0: dense) ---
    num_experts: int = 0
    experts_per_token: int = 0
    expert_dim: int | None = None  # hidden size of one expert; None: intermediate_dim
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to one
    dense_layers: tuple[int, ...] = ()  # layers that keep a dense MLP in an MoE model
    router_scoring: str = "softmax"  # "sigmoid": each expert scored on its own (Llama 4)
    router_weights_inputs: bool = False  # router weights scale the expert's input (Llama 4), not its output
    shared_expert_dim: int | None = None  # an always-on expert of this hidden size in each MoE layer
    # --- score head (reward / value models, models/score.py); None: the LM head over the vocabulary ---
    num_labels: int | None = None
    score_per_token: bool = False  # the score head reads every token (*ForTokenClassification: a PRM)

    def __post_init__(self) -> None:
        problem = next(_shape_problems(self), None)
        if problem is not None:
            raise ValueError(problem)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def resolved_out_bias(self) -> bool:
        return self.attn_bias if self.attn_out_bias is None else self.attn_out_bias

    def layer_type(self, i: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[i]
        return SLIDING if self.sliding_window else FULL

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full causal attention."""
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def chunk(self, i: int) -> int | None:
        """The attention chunk of layer i, or None."""
        return self.attn_chunk_size if self.layer_type(i) == CHUNKED else None

    def has_rope(self, i: int) -> bool:
        return i not in self.nope_layers

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        hd = self.resolved_head_dim
        attn = self.dim * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attn_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.resolved_out_bias:
            attn += self.dim
        dense = 3 * self.dim * self.intermediate_dim
        if self.mlp_bias:
            dense += 2 * self.intermediate_dim + self.dim
        moe = self.num_experts * 3 * self.dim * (self.expert_dim or self.intermediate_dim)
        moe += self.dim * self.num_experts  # router
        moe += 3 * self.dim * (self.shared_expert_dim or 0)
        norms = (4 if self.sandwich_norms else 2) * self.dim
        total = 0
        for i in range(self.num_layers):
            qk_norms = 2 * hd if self.qk_norm and self.qk_norm_weight and self.has_rope(i) else 0
            total += attn + qk_norms + norms + (moe if self.is_moe_layer(i) else dense)
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        if self.num_labels is not None:
            head = self.num_labels * self.dim
        return self.vocab_size * self.dim + total + self.dim + head


# Our field -> the config.json key it is read from, so that a message names what the user edits.
_HF_NAMES = {"dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "intermediate_dim": "intermediate_size",
             "max_seq_len": "max_position_embeddings", "experts_per_token": "num_experts_per_tok"}
_POSITIVE = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "intermediate_dim", "max_seq_len")


def _name(field: str) -> str:
    return f"{_HF_NAMES[field]} ({field})" if field in _HF_NAMES else field


def _shape_problems(a: ModelArgs) -> Iterator[str]:
    """Why these args cannot build a decoder, first problem first (lazily: a later check may
    divide by what an earlier one found to be zero). Checked when the args are made, so a bad config.json fails before any
    weight is read, not as an assertion deep in attention."""
    for field_name in _POSITIVE:
        value = getattr(a, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            yield f"{_name(field_name)} must be a positive whole number, got {value!r}"
    if a.head_dim is not None and (not isinstance(a.head_dim, int) or a.head_dim < 1):
        yield f"head_dim must be a positive whole number, got {a.head_dim!r}"
    if a.num_heads % a.num_kv_heads:
        yield (f"{_name('num_kv_heads')} = {a.num_kv_heads} does not divide {_name('num_heads')} = "
               f"{a.num_heads}: each key/value head serves a whole group of query heads")
    if a.head_dim is None and a.dim % a.num_heads:
        yield (f"{_name('num_heads')} = {a.num_heads} does not divide {_name('dim')} = {a.dim} "
               f"(and no head_dim is given)")
    rotary = a.rotary_dim or a.resolved_head_dim
    if rotary % 2 or rotary > a.resolved_head_dim:
        yield f"the rotary dim {rotary} must be even and at most the head dim {a.resolved_head_dim}"
    if a.num_experts < 0 or (a.num_experts and not 1 <= a.experts_per_token <= a.num_experts):
        yield (f"{_name('experts_per_token')} = {a.experts_per_token} must be between 1 and the "
               f"number of experts, {a.num_experts}")
    if a.sliding_window is not None and a.sliding_window < 1:
        yield f"sliding_window must be positive, got {a.sliding_window}"
    if a.layer_types is not None and (len(a.layer_types) != a.num_layers
                                      or not set(a.layer_types) <= {FULL, SLIDING, CHUNKED}):
        yield (f"layer_types must list {FULL!r}, {SLIDING!r} or {CHUNKED!r} for each of the "
               f"{a.num_layers} layers, got {list(a.layer_types)}")
    if CHUNKED in (a.layer_types or ()) and not (isinstance(a.attn_chunk_size, int) and a.attn_chunk_size > 0):
        yield f"attention_chunk_size must be a positive whole number for chunked layers, got {a.attn_chunk_size!r}"
    if a.router_scoring not in ("softmax", "sigmoid"):
        yield f"router scoring must be 'softmax' or 'sigmoid', got {a.router_scoring!r}"
