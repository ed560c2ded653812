"""Load a YAML config, apply `key=value` / `~key` overrides, resolve interpolations.

Configs are OmegaConf YAML (torchtune's format). Every error is a `ConfigError` whose message is
one line naming the file and the key, so the CLI can print it and exit non-zero before any work.
Validation against a recipe's schema lives in `training/schema.py`; building objects from
`_component_` nodes in `training/instantiate.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import omegaconf
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunewright.training.errors import ConfigError  # defined there so `tune` starts light


def _register_resolvers() -> None:
    # `${tiny:llama}` makes (once, deterministically) the tiny random model or dataset that the
    # `tiny` configs train, so they run anywhere with no download.
    if not OmegaConf.has_resolver("tiny"):

        def _tiny(name: str) -> str:
            from tunewright.training.tiny_assets import tiny_asset

            return str(tiny_asset(name))

        # OmegaConf 2.4 renamed register_new_resolver (now warning on every call) to
        # register_resolver; before 2.4, register_resolver is the legacy string-only API.
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", omegaconf.__version__).groups())
        new_api = (major, minor) >= (2, 4)
        register = OmegaConf.register_resolver if new_api else OmegaConf.register_new_resolver
        register("tiny", _tiny)


def _parse_override(item: str) -> tuple[str, str | None]:
    """`a.b=1` -> ("a.b", "1"); `~a.b` -> ("a.b", None) meaning delete."""
    if item.startswith("~"):
        return item[1:], None
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value or ~key")
    key, value = item.split("=", 1)
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    return key, value


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str) -> DictConfig:
    for item in overrides:
        key, value = _parse_override(item)
        if value is None:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise ConfigError(f"{source}: cannot delete '{key}': no such key")
            del parent[leaf]
            continue
        try:
            # from_dotlist parses the value as YAML, so `lr=1e-4` is a float and `x=null` is None.
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
            cfg = OmegaConf.merge(cfg, parsed)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {str(e).splitlines()[0]}") from None
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), *, resolve_values: bool = True) -> DictConfig:
    """Read `path`, apply overrides and resolve every interpolation (a bad one names its key);
    `resolve_values=False` keeps `${...}` as written (e.g. to print a reusable config)."""
    _register_resolvers()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    cfg = apply_overrides(cfg, overrides, str(path))
    if resolve_values:
        resolve(cfg, str(path))
    return cfg


def resolve(cfg: DictConfig, source: str) -> None:
    """Resolve interpolations in place, naming the key whose interpolation fails."""

    def walk(node: Any, prefix: str) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for k, _ in list(items):
            key = f"{prefix}{k}" if prefix else str(k)
            try:
                value = node[k]
            except OmegaConfBaseException as e:
                msg = str(e).splitlines()[0]
                raise ConfigError(f"{source}: key '{key}': cannot resolve: {msg}") from None
            except ValueError as e:  # raised by our own resolvers
                raise ConfigError(f"{source}: key '{key}': {e}") from None
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, key + ".")

    walk(cfg, "")
    OmegaConf.resolve(cfg)


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
