"""Which family reads a checkpoint: `config.json`'s `model_type`, then `architectures`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from tunewright.models.family import Family

# family name -> module defining FAMILY; imported only when used.
FAMILY_MODULES: dict[str, str] = {
    "llama": "tunewright.models.llama",
}


def get_family(name: str) -> Family:
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family '{name}' (known: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def all_families() -> list[Family]:
    return [get_family(n) for n in FAMILY_MODULES]


def family_for_config(config: dict[str, Any], source: str) -> Family:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for family in all_families():
        if model_type in family.model_types or family.architecture in architectures:
            return family
    known = sorted(t for f in all_families() for t in f.model_types)
    raise ValueError(
        f"{source}: unsupported model_type '{model_type}' (architectures {architectures}); "
        f"supported: {', '.join(known)}"
    )


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def find_size(name: str):
    """`llama3_2_1b` -> (family, ModelArgs) from the families' size tables."""
    for family in all_families():
        if name in family.sizes:
            return family, family.sizes[name]
    sizes = sorted(s for f in all_families() for s in f.sizes)
    raise ValueError(f"unknown model size '{name}'; known: {', '.join(sizes)}")
