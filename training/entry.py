"""How a recipe file is run: load its config, validate it against the recipe's schema, call main.

A recipe is a plain script defining `Config` (a dataclass, usually a `TrainConfig` subclass) and
`main(cfg: Config)`. Both `tune run` and `python recipe.py --config CFG k=v` (and torchrun)
go through `run_recipe_file`, so a config is checked the same way everywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from tunewright.training.config import ConfigError, load_config, to_dict
from tunewright.training.errors import user_error_line
from tunewright.training.schema import build, validate


def import_recipe(path: str | Path) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    name = f"tunewright_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    for attr in ("Config", "main"):
        if not hasattr(module, attr):
            raise ConfigError(f"{path}: a recipe must define '{attr}'")
    return module


def load_recipe_config(module: ModuleType, config_path: str | Path, overrides: Sequence[str]) -> Any:
    """Load + override + validate; returns the recipe's `Config` instance."""
    cfg = to_dict(load_config(config_path, overrides))
    validate(cfg, module.Config, str(config_path))
    return build(cfg, module.Config)


def run_recipe_file(recipe_path: str | Path, config_path: str | Path, overrides: Sequence[str]) -> Any:
    module = import_recipe(recipe_path)
    cfg = load_recipe_config(module, config_path, overrides)
    return module.main(cfg)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, shown as one line (TUNEWRIGHT_DEBUG=1 shows tracebacks)."""
    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except user_errors() as e:
        if os.environ.get("TUNEWRIGHT_DEBUG"):
            raise
        print(user_error_line(e), file=sys.stderr)
        sys.exit(2)


def recipe_main(recipe_file: str) -> None:
    """`if __name__ == "__main__": recipe_main(__file__)` at the bottom of every recipe."""
    parser = argparse.ArgumentParser(prog=Path(recipe_file).name)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value or ~key")
    args = parser.parse_args()
    exit_on_user_error(lambda: run_recipe_file(recipe_file, args.config, args.overrides))
