"""How a recipe file is run: load its config, validate it against the recipe's schema, call main.

A recipe is a plain script defining `Config` (a dataclass, usually a `TrainConfig` subclass) and
`main(cfg: Config)`. Both `tune run` and `python recipe.py --config CFG k=v` (and torchrun)
go through `run_recipe_file`, so a config is checked the same way everywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from tunewright.training.config import ConfigError, load_config_with_env, remember_env_keys, to_dict
from tunewright.training.errors import INTERRUPTED, USER_ERRORS, report_user_error, user_error_line
from tunewright.training.instantiate import components_allowed
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
    """Load + override + validate; returns the recipe's `Config` instance (which remembers the
    keys that came from environment variables, so `config.yaml` is saved without them)."""
    loaded, from_env = load_config_with_env(config_path, overrides)
    cfg = to_dict(loaded)
    validate(cfg, module.Config, str(config_path))
    return remember_env_keys(build(cfg, module.Config), from_env)


def run_recipe_file(recipe_path: str | Path, config_path: str | Path, overrides: Sequence[str]) -> Any:
    module = import_recipe(recipe_path)
    cfg = load_recipe_config(module, config_path, overrides)
    return module.main(cfg)


_interrupted = False  # a torchrun worker got Ctrl-C (`_stop_quietly`)


def _stop_quietly(signum: int, frame: object) -> None:
    """A torchrun worker's SIGINT: its launcher and `tune run` say it once, so the worker ends
    without a traceback, and drops what torch prints as the other ranks go (gloo's lost peers)."""
    global _interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: a second Ctrl-C must not cut the exit short
    if not _interrupted:
        _interrupted = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        raise KeyboardInterrupt


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """Run `fn`; a user error ends in one `error:` line and exit 2 (TUNEWRIGHT_DEBUG=1 shows
    the traceback), Ctrl-C in `error: interrupted` and exit 130 (silently in a torchrun worker:
    whatever a rank raises after the interrupt is part of stopping)."""
    try:
        return fn()
    except (KeyboardInterrupt, Exception) as e:
        if _interrupted or isinstance(e, KeyboardInterrupt):
            if not _interrupted:
                print("error: interrupted", file=sys.stderr)
            sys.exit(INTERRUPTED)
        if not isinstance(e, USER_ERRORS) or os.environ.get("TUNEWRIGHT_DEBUG"):
            raise
        report_user_error(user_error_line(e))
        sys.exit(2)


def recipe_main(recipe_file: str) -> None:
    """`if __name__ == "__main__": recipe_main(__file__)` at the bottom of every recipe."""
    parser = argparse.ArgumentParser(prog=Path(recipe_file).name)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--allow-components", default="", metavar="PKG[,PKG]",
                        help="packages outside tunewright, torch, torchao whose callables the "
                        "config may name (also: TUNEWRIGHT_ALLOW_COMPONENTS)")
    parser.add_argument("overrides", nargs="*", help="key=value or ~key")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a torchrun worker
        signal.signal(signal.SIGINT, _stop_quietly)

    def run() -> Any:
        with components_allowed([p for p in args.allow_components.split(",") if p.strip()]):
            return run_recipe_file(recipe_file, args.config, args.overrides)

    exit_on_user_error(run)
