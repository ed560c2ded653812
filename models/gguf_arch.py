"""Each family as llama.cpp stores it: architecture name, tensor layout, what its converter
(`convert_hf_to_gguf.py`) changes in the weights, its metadata, and what it cannot represent.

llama.cpp hard-codes some choices per architecture that a Hugging Face config leaves free
(Gemma's query scale and window pattern, Qwen3-MoE's renormalised router, no sliding window for
Llama/Qwen); a model that differs from them would run differently there, so `problem` names
the difference and the export stops instead of writing a file that answers wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from tunewright.models.args import FULL, SLIDING, ModelArgs
from tunewright.models.gguf_names import (
    LAYER_NAMES, MIXTRAL_EXPERT_NAMES, PHI3_NAMES, QK_NORM_NAMES, QWEN_EXPERT_NAMES, SANDWICH_NAMES,
    without_mlp,
)

Writer = Any  # gguf.GGUFWriter (imported lazily: `tune` starts without gguf)


@dataclass(frozen=True)
class GGUFArch:
    arch: str  # general.architecture
    names: dict[str, str]  # GGUF name in blk.N -> HF name in model.layers.N
    # llama.cpp's LlamaModel reorders q/k rows for its interleaved-pair RoPE (`permute_qk`).
    permute_qk: bool = False
    # Gemma checkpoints store RMSNorm weights minus one; llama.cpp multiplies by the weight.
    norm_shift: float = 0.0
    # llama.cpp runs sliding-window attention for this architecture (else: none, see `context_length`).
    sliding_window: bool = False
    problem: Callable[[ModelArgs], str | None] = lambda a: None
    metadata: Callable[[Writer, ModelArgs], None] = lambda w, a: None


def context_length(arch: GGUFArch, a: ModelArgs) -> int:
    """The context the file declares. Where llama.cpp runs no sliding window (Mistral v0.1,
    Qwen2 with `use_sliding_window`, Phi-3-mini-4k), capping it at the window keeps every
    position within it, so llama.cpp and the model attend to the same keys inside it."""
    if arch.sliding_window or a.sliding_window is None:
        return a.max_seq_len
    if all(a.layer_type(i) == FULL for i in range(a.num_layers)):
        return a.max_seq_len
    return min(a.max_seq_len, a.sliding_window)


def _rope_problem(a: ModelArgs, allowed: tuple[str, ...]) -> str | None:
    kind = (a.rope_scaling or {}).get("rope_type", (a.rope_scaling or {}).get("type"))
    if a.rope_scaling is not None and kind not in allowed:
        return f"rope scaling '{kind}' (llama.cpp's converter writes {', '.join(allowed) or 'none'} here)"
    return None


def _write_rope_scaling(w: Writer, a: ModelArgs) -> None:
    """Linear scaling as keys; Llama-3's as a tensor (`rope_freqs`, planned by the exporter)."""
    from gguf import RopeScalingType

    if (a.rope_scaling or {}).get("rope_type", (a.rope_scaling or {}).get("type")) == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(a.rope_scaling["factor"]))


def _dense_problem(a: ModelArgs) -> str | None:
    if a.mlp_bias:
        return "MLP biases (llama.cpp's converter has no place for them here)"
    return _rope_problem(a, ("linear", "llama3"))


def _llama_meta(w: Writer, a: ModelArgs) -> None:
    _head_meta(w, a)  # else llama.cpp takes dim / heads, wrong where head_dim is set apart
    w.add_rope_dimension_count(a.rotary_dim or a.resolved_head_dim)
    _write_rope_scaling(w, a)


def _moe_meta(w: Writer, a: ModelArgs) -> None:
    w.add_expert_count(a.num_experts)
    w.add_expert_used_count(a.experts_per_token)


def _mixtral_meta(w: Writer, a: ModelArgs) -> None:
    _llama_meta(w, a)
    _moe_meta(w, a)


def _qwen3_moe_problem(a: ModelArgs) -> str | None:
    if a.dense_layers:
        return f"dense MLP blocks {list(a.dense_layers)} (llama.cpp's qwen3moe has experts in every block)"
    if not a.norm_topk_prob:
        return "norm_topk_prob=false (llama.cpp's qwen3moe always renormalises the top-k weights)"
    return _rope_problem(a, ("linear",))


def _qwen3_moe_meta(w: Writer, a: ModelArgs) -> None:
    _qwen_meta(w, a)
    _moe_meta(w, a)
    w.add_expert_feed_forward_length(a.expert_dim or a.intermediate_dim)


def _gemma_scale_problem(a: ModelArgs, *, pattern: int, layers_27b: int) -> str | None:
    """llama.cpp derives the query scale (1/sqrt(head_dim), or 1/sqrt(dim/heads) for the 27B
    model, which it knows by its layer count) and the local/global pattern; it stores neither."""
    want = (a.dim / a.num_heads if a.num_layers == layers_27b else a.resolved_head_dim) ** -0.5
    if a.attn_scale is not None and not math.isclose(a.attn_scale, want, rel_tol=1e-6):
        return (f"query scale {a.attn_scale:.6g} (query_pre_attn_scalar); llama.cpp uses {want:.6g} "
                "for this shape")
    expected = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(a.num_layers))
    if a.sliding_window is not None and tuple(a.layer_type(i) for i in range(a.num_layers)) != expected:
        return f"layer_types other than every {pattern}th layer global (llama.cpp's fixed pattern)"
    return None


def _gemma2_problem(a: ModelArgs) -> str | None:
    if a.attn_softcap is None or a.final_softcap is None:
        return "no attention or final soft-cap (llama.cpp's gemma2 applies both)"
    return _gemma_scale_problem(a, pattern=2, layers_27b=46) or _rope_problem(a, ())


def _head_meta(w: Writer, a: ModelArgs) -> None:
    w.add_key_length(a.resolved_head_dim)
    w.add_value_length(a.resolved_head_dim)


def _gemma2_meta(w: Writer, a: ModelArgs) -> None:
    _head_meta(w, a)
    w.add_attn_logit_softcapping(a.attn_softcap)
    w.add_final_logit_softcapping(a.final_softcap)
    if a.sliding_window is not None:
        w.add_sliding_window(a.sliding_window)


def _gemma3_problem(a: ModelArgs) -> str | None:
    if a.attn_softcap is not None or a.final_softcap is not None:
        return "soft-capping (llama.cpp's gemma3 has none)"
    if a.local_rope_base not in (None, 10000.0):
        return f"local RoPE base {a.local_rope_base} (llama.cpp's gemma3 fixes 10000)"
    return _gemma_scale_problem(a, pattern=6, layers_27b=62) or _rope_problem(a, ("linear",))


def _gemma3_meta(w: Writer, a: ModelArgs) -> None:
    _head_meta(w, a)
    if a.sliding_window is not None:
        w.add_sliding_window(a.sliding_window)
    _write_rope_scaling(w, a)


def _phi3_meta(w: Writer, a: ModelArgs) -> None:
    w.add_rope_dimension_count(a.rotary_dim or a.resolved_head_dim)
    scaling = a.rope_scaling or {}
    original = scaling.get("original_max_position_embeddings", a.max_seq_len)
    w.add_rope_scaling_orig_ctx_len(original)
    if a.sliding_window is not None:
        w.add_sliding_window(a.sliding_window)
    if scaling:  # LongRoPE: factors as tensors (the exporter plans them) and the attention factor
        scale = a.max_seq_len / original
        default = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
        w.add_rope_scaling_attn_factors(float(scaling.get("attention_factor") or default))


def _qwen_meta(w: Writer, a: ModelArgs) -> None:
    _head_meta(w, a)
    _write_rope_scaling(w, a)


_LLAMA = dict(names=LAYER_NAMES, permute_qk=True, problem=_dense_problem, metadata=_llama_meta)
_GEMMA_ATTN_MLP = {g: h for g, h in LAYER_NAMES.items() if not g.endswith("norm")}

ARCHS: dict[str, GGUFArch] = {  # our family -> llama.cpp's architecture
    "llama": GGUFArch("llama", **_LLAMA),
    "mistral": GGUFArch("llama", **_LLAMA),  # llama.cpp converts Mistral as a Llama
    "mixtral": GGUFArch("llama", {**without_mlp(LAYER_NAMES), **MIXTRAL_EXPERT_NAMES}, permute_qk=True,
                        problem=lambda a: _rope_problem(a, ("linear",)), metadata=_mixtral_meta),
    "qwen2": GGUFArch("qwen2", LAYER_NAMES, problem=lambda a: _rope_problem(a, ("linear",)), metadata=_qwen_meta),
    "qwen3": GGUFArch("qwen3", {**LAYER_NAMES, **QK_NORM_NAMES},
                      problem=lambda a: _rope_problem(a, ("linear",)), metadata=_qwen_meta),
    "qwen3_moe": GGUFArch("qwen3moe", {**without_mlp(LAYER_NAMES), **QK_NORM_NAMES, **QWEN_EXPERT_NAMES},
                          problem=_qwen3_moe_problem, metadata=_qwen3_moe_meta),
    "gemma": GGUFArch("gemma", LAYER_NAMES, norm_shift=1.0,
                      problem=lambda a: _rope_problem(a, ()), metadata=_head_meta),
    "gemma2": GGUFArch("gemma2", {**_GEMMA_ATTN_MLP, **SANDWICH_NAMES}, norm_shift=1.0, sliding_window=True,
                       problem=_gemma2_problem, metadata=_gemma2_meta),
    "gemma3": GGUFArch("gemma3", {**_GEMMA_ATTN_MLP, **SANDWICH_NAMES, **QK_NORM_NAMES}, norm_shift=1.0,
                       sliding_window=True, problem=_gemma3_problem, metadata=_gemma3_meta),
    # llama.cpp reads Phi-3's window key but runs without it (its PR 13676): the context is capped.
    "phi3": GGUFArch("phi3", PHI3_NAMES, problem=lambda a: _rope_problem(a, ("longrope",)), metadata=_phi3_meta),
}
