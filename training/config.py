"""Load a YAML config, apply `key=value` / `~key` overrides, resolve interpolations.

Configs are OmegaConf YAML (torchtune's format). Every error is a `ConfigError` whose message is
one line naming the file and the key, so the CLI can print it and exit non-zero before any work.
Validation against a recipe's schema lives in `training/schema.py`; building objects from
`_component_` nodes in `training/instantiate.py`.

Values from the environment (`${oc.env:HF_TOKEN}`) are secrets as far as we know: a run's saved
`config.yaml` holds them as written, not resolved (`load_config_with_env`, `as_written`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

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


def _as_typed(item: str, text: str) -> str | None:
    """The override value `text` as the plain string the user typed, or None to read it as YAML.

    On a command line `prompt=Reverse the letters: abc` is a sentence: YAML would read a mapping
    (`{Reverse the letters: abc}`), and `note=see #3` would lose ` #3` as a comment. So text
    becomes a mapping or list only in flow style (`[a, b]`, `{k: v}`), and YAML may not drop
    any of it; quotes (`prompt='"a: b"'`) still make a YAML string.
    """
    start = text.lstrip()[:1]
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as e:  # yaml's errors, whose types vary
        if start in ("[", "{", '"', "'"):  # meant as YAML: say what is wrong with it
            why = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"override '{item}': not valid YAML: {why}") from None
        return text  # e.g. `prompt=Say: "hi" now`
    if isinstance(parsed, (dict, list)) and start not in ("[", "{"):
        return text
    if isinstance(parsed, str) and start not in ('"', "'") and parsed != text.strip():
        return text
    return None


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
            text = _as_typed(item, value)
            if text is not None:
                OmegaConf.update(cfg, key, text, merge=True)
                continue
            # from_dotlist parses the value as YAML, so `lr=1e-4` is a float and `x=null` is None.
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {str(e).splitlines()[0]}") from None
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), *, resolve_values: bool = True) -> DictConfig:
    """Read `path`, apply overrides and resolve every interpolation (a bad one names its key);
    `resolve_values=False` keeps `${...}` as written (e.g. to print a reusable config)."""
    if resolve_values:
        return load_config_with_env(path, overrides)[0]
    return _load_unresolved(path, overrides)


# A path to a value in the config: keys and list indices (`("dataset", "data_files", 0)`).
KeyPath = tuple[Union[str, int], ...]
_ENV_NAME = re.compile(r"\$\{oc\.env:\s*([^,}\s]+)")


def load_config_with_env(path: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[KeyPath, Any]]:
    """`load_config`, plus the keys whose resolved value holds the value of an environment
    variable (`${oc.env:HF_TOKEN}`, or a key interpolating such a key), each with its value as
    written: what a saved copy of the config holds instead of the secret (`as_written`)."""
    cfg = _load_unresolved(path, overrides)
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolve(cfg, str(path))
    names = {m.group(1) for text in _strings(raw) for m in _ENV_NAME.finditer(text)}
    secrets = {os.environ[n] for n in names if os.environ.get(n)}
    return cfg, _from_env(raw, to_dict(cfg), secrets, ()) if secrets else {}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)


def _from_env(raw: Any, resolved: Any, secrets: set[str], at: KeyPath) -> dict[KeyPath, Any]:
    if isinstance(raw, dict) and isinstance(resolved, dict):
        pairs = [(k, raw[k], resolved[k]) for k in resolved if k in raw]
    elif isinstance(raw, list) and isinstance(resolved, list) and len(raw) == len(resolved):
        pairs = [(i, r, v) for i, (r, v) in enumerate(zip(raw, resolved))]
    else:
        found = any(secret in text for text in _strings(resolved) for secret in secrets)
        return {at: raw} if found else {}
    out: dict[KeyPath, Any] = {}
    for key, r, v in pairs:
        out.update(_from_env(r, v, secrets, (*at, key)))
    return out


_AS_WRITTEN = "_tunewright_from_env"


def remember_env_keys(config: Any, from_env: dict[KeyPath, Any]) -> Any:
    """Attach `load_config_with_env`'s keys to the built config object (for `as_written`)."""
    if from_env:
        object.__setattr__(config, _AS_WRITTEN, dict(from_env))
    return config


def as_written(config: Any) -> dict[str, Any]:
    """The config's values (a dataclass or a mapping) for saving: every value that came from an
    environment variable is put back as written (`${oc.env:HF_TOKEN}`), never in clear."""
    values = copy.deepcopy(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config))
    for path, raw in getattr(config, _AS_WRITTEN, {}).items():
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = raw
    return values


def _load_unresolved(path: str | Path, overrides: Sequence[str]) -> DictConfig:
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
    return apply_overrides(cfg, overrides, str(path))


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
