"""What a model family is: data (sizes, HF config fields, weight names) plus its builder.

Most families only describe themselves here and reuse `build_decoder`; one that really differs
passes its own `build` that swaps a part (a norm, an attention option, an MoE block).
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any, Callable

from tunewright.models.args import ModelArgs
from tunewright.models.builder import build_decoder
from tunewright.models.score import config_num_labels, is_token_classifier
from tunewright.models.weight_map import WeightMap


def rope_theta(config: dict[str, Any], default: float = 10000.0) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`.
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or default)


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else {k: v for k, v in scaling.items() if k != "rope_theta"}


def shape_from_hf(
    c: dict[str, Any], family: str, *, head_dim: int | None = None, norm_eps: float = 1e-6,
    max_seq_len: int = 4096, tie_embeddings: bool = False,
) -> dict[str, Any]:
    """The `ModelArgs` fields every decoder's config.json states the same way; keyword defaults
    are the family's config-class defaults for keys a config.json may leave out."""
    return dict(
        family=family,
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        intermediate_dim=c["intermediate_size"],
        head_dim=c.get("head_dim") or head_dim,
        norm_eps=c.get("rms_norm_eps", norm_eps),
        max_seq_len=c.get("max_position_embeddings", max_seq_len),
        tie_embeddings=bool(c.get("tie_word_embeddings", tie_embeddings)),
        num_labels=config_num_labels(c),  # a *ForSequenceClassification checkpoint's score head
        score_per_token=is_token_classifier(c),  # or a *ForTokenClassification one's
    )


def shape_to_hf(a: ModelArgs, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json fields of `shape_from_hf`, from a row."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "intermediate_size": a.intermediate_dim,
        "head_dim": a.resolved_head_dim,
        "rms_norm_eps": a.norm_eps,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": a.tie_embeddings,
    }


@dataclass
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this family reads
    architecture: str  # config.json `architectures[0]` written on save
    sizes: dict[str, ModelArgs]
    weight_map: WeightMap
    args_from_hf: Callable[[dict[str, Any]], ModelArgs]
    hf_config: Callable[[ModelArgs], dict[str, Any]]
    # A small random row (a few layers, dim ~128, vocab 288 = the byte-level test tokenizer) that
    # `${tiny:<name>}` configs and tests train; it should switch on every option the family has.
    tiny: ModelArgs | None = None
    build: Callable[[ModelArgs], Any] = field(default=build_decoder)
    # Tensor-parallel plan (block-relative module path -> "colwise" / "rowwise" / "per_head") for
    # a family whose blocks differ; None: `training/tensor_parallel.py`'s DEFAULT_TP_PLAN.
    tp_plan: dict[str, str] | None = None
    # `model_type`s (among model_types) of multimodal checkpoints whose text model is ours: the
    # rest is skipped on load, so saving from one writes the text-only `hf_config`, not its config.
    multimodal_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Each call gets its own nested dicts: a caller that edits the config (transformers'
        # PretrainedConfig fills in rope_scaling in place) must not change a size row's.
        written = self.hf_config
        self.hf_config = lambda args: copy.deepcopy(written(args))
