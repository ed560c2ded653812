"""Build objects from `_component_` nodes (torchtune's convention), recursively.

`{"_component_": "torch.optim.AdamW", "lr": 1e-4}` becomes `torch.optim.AdamW(params, lr=1e-4)`
when the recipe calls `instantiate(node, params)`. Nested nodes with a `_component_` are built
first, so a dataset can take a built tokenizer and a loss a built module.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from tunewright.training.config import ConfigError

COMPONENT_KEY = "_component_"


def resolve_component(path: str, *, where: str = "key '_component_'") -> Callable[..., Any]:
    """Import a dotted path such as `torch.optim.AdamW` or `tunewright.data.sft_dataset`;
    `where` names the config key in error messages."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where} must be a dotted path such as torch.optim.AdamW, got {path!r}")
    parts = path.split(".")
    # Longest importable module prefix, then attributes (classes may hold static builders).
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name):
                raise  # the module exists but one of *its* imports is missing: a real bug
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if not callable(obj):
            raise ConfigError(f"{where}: {path} is not callable")
        return obj
    raise ConfigError(f"{where}: cannot import {path}")


def is_component(node: Any) -> bool:
    return isinstance(node, (dict, DictConfig)) and COMPONENT_KEY in node


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the node's `_component_` with its other keys (built recursively) plus `kwargs`.

    `kwargs` are what the recipe supplies at run time (parameters, the tokenizer, the number of
    training steps); they override config values of the same name.
    """
    if node is None:
        return None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not is_component(node):
        raise ConfigError(f"expected a mapping with a '{COMPONENT_KEY}' key, got {node!r}")
    fn = resolve_component(node[COMPONENT_KEY])
    params = {k: _build(v) for k, v in node.items() if k != COMPONENT_KEY}
    params.update(kwargs)
    return fn(*args, **params)


def _build(value: Any) -> Any:
    if is_component(value):
        return instantiate(value)
    if isinstance(value, dict):
        return {k: _build(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v) for v in value]
    return value
