"""Which family reads a checkpoint: `config.json`'s `model_type`, then `architectures`."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from tunewright.data.files import read_json
from tunewright.models.args import ModelArgs
from tunewright.models.family import Family


def _family_packages() -> list[str]:
    """Every sub-package of `tunewright.models` is a family module (Llama, Qwen2, ...): adding
    a family is adding a folder, with no list to edit here."""
    import tunewright.models as models

    return sorted(m.name for m in pkgutil.iter_modules(models.__path__) if m.ispkg)


@functools.cache
def all_families() -> tuple[Family, ...]:
    """Each family module defines `FAMILY`, or `FAMILIES` when one module serves several."""
    out: list[Family] = []
    for name in _family_packages():
        module = importlib.import_module(f"tunewright.models.{name}")
        out.extend(getattr(module, "FAMILIES", None) or [module.FAMILY])
    return tuple(out)


def get_family(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    known = ", ".join(f.name for f in all_families())
    raise ValueError(f"unknown model family '{name}' (known: {known})")


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
    return read_json(path)


def model_args(model_dir: str | Path) -> tuple[Family, ModelArgs]:
    """The family and shape a Hugging Face directory's config.json describes, without reading
    a weight; a key it lacks or a shape that cannot work (heads that do not divide) is one
    line naming the file."""
    path = Path(model_dir) / "config.json"
    config = read_config(model_dir)
    family = family_for_config(config, str(path))
    try:
        return family, family.args_from_hf(config)
    except KeyError as e:
        raise ValueError(f"{path}: lacks the key {e} that a {family.name} config needs") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def find_size(name: str):
    """`llama3_2_1b` -> (family, ModelArgs) from the families' size tables."""
    for family in all_families():
        if name in family.sizes:
            return family, family.sizes[name]
    sizes = sorted(s for f in all_families() for s in f.sizes)
    raise ValueError(f"unknown model size '{name}'; known: {', '.join(sizes)}")
