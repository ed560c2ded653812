"""Build objects from `_component_` nodes (torchtune's convention), recursively.

`{"_component_": "torch.optim.AdamW", "lr": 1e-4}` becomes `torch.optim.AdamW(params, lr=1e-4)`
when the recipe calls `instantiate(node, params)`. Nested nodes with a `_component_` are built
first, so a dataset can take a built tokenizer and a loss a built module.

A config is code: `_component_: os.system` would run a shell. So a dotted path resolves only
inside the packages a config may call (`ALLOWED`) or those the person running it allowed, by
`tune run --allow-components PKG` or the environment variable `TUNEWRIGHT_ALLOW_COMPONENTS`
(comma-separated, inherited by torchrun's workers); the few functions in those packages that
load or run other code (`DENIED`) need the same explicit allowance. The path is checked before
anything is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from tunewright.training.config import ConfigError

COMPONENT_KEY = "_component_"
ALLOW_ENV = "TUNEWRIGHT_ALLOW_COMPONENTS"
ALLOWED = ("tunewright", "torch", "torchao")
# Inside ALLOWED, but they fetch, unpickle, compile or import code named by their arguments.
DENIED = ("torch.hub", "torch.load", "torch.jit.load", "torch.package", "torch.ops",
          "torch.utils.cpp_extension", "torch.utils.benchmark", "torch.distributed.run",
          "tunewright.training.entry", "tunewright.training.instantiate")
_PREFIX = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _prefixes(text: str, source: str) -> tuple[str, ...]:
    """`mypkg,other.losses.` -> ("mypkg", "other.losses"); anything else fails naming `source`."""
    prefixes = tuple(p.strip().rstrip(".") for p in text.split(",") if p.strip())
    bad = [p for p in prefixes if not _PREFIX.fullmatch(p)]
    if bad:
        raise ConfigError(f"{source}: '{bad[0]}' is not a dotted package path such as mypkg or mypkg.losses")
    return prefixes


def allowed_by_user() -> tuple[str, ...]:
    """The package prefixes `TUNEWRIGHT_ALLOW_COMPONENTS` allows."""
    return _prefixes(os.environ.get(ALLOW_ENV, ""), ALLOW_ENV)


@contextlib.contextmanager
def components_allowed(prefixes: Sequence[str]) -> Iterator[None]:
    """Add `prefixes` (from `--allow-components`) to `TUNEWRIGHT_ALLOW_COMPONENTS` while the
    block runs, and for the processes it starts."""
    added = _prefixes(",".join(prefixes), "--allow-components")  # a bad one fails before any work
    saved = os.environ.get(ALLOW_ENV)
    os.environ[ALLOW_ENV] = ",".join([*([saved] if saved else []), *added])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ALLOW_ENV, None)
        else:
            os.environ[ALLOW_ENV] = saved


def check_allowed(path: str, *, where: str) -> None:
    """Refuse a `_component_` path outside the allowed packages, before importing anything."""
    if _under(path, allowed_by_user()):
        return
    package = path.split(".")[0]
    allow = f"if you trust this config, allow it: --allow-components {{p}} (or {ALLOW_ENV}={{p}})"
    if _under(path, DENIED):
        prefix = next(p for p in DENIED if _under(path, (p,)))
        raise ConfigError(f"{where}: {path} loads or runs code its arguments name, so a config may "
                          f"not call it; {allow.format(p=prefix)}")
    if not _under(path, ALLOWED):
        raise ConfigError(f"{where}: {path} is outside the packages a config may call "
                          f"({', '.join(ALLOWED)}); {allow.format(p=package)}")


def resolve_component(path: str, *, where: str = "key '_component_'") -> Callable[..., Any]:
    """Import a dotted path such as `torch.optim.AdamW` or `tunewright.data.sft_dataset`;
    `where` names the config key in error messages."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where} must be a dotted path such as torch.optim.AdamW, got {path!r}")
    check_allowed(path, where=where)
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
