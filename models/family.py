"""What a model family is: data (sizes, HF config fields, weight names) plus its builder.

Most families only describe themselves here and reuse `build_decoder`; one that really differs
passes its own `build` that swaps a part (a norm, an attention option, an MoE block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tunewright.models.args import ModelArgs
from tunewright.models.builder import build_decoder
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
