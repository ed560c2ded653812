"""`tune run [TORCHRUN FLAGS] RECIPE --config CONFIG [key=value | ~key ...]`.

Without torchrun flags the recipe runs in this process through `run_recipe_file`. With them,
`tune` replaces itself with `python -m torch.distributed.run FLAGS recipe.py --config CFG ...`
and each worker's `recipe_main` loads the config; the config is checked here first so that a
typo prints one line instead of one per worker plus torchrun's failure report.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tunewright.tune_cli.catalog import UsageError, canonical, find_config, find_recipe, recipe_of, suggest

# torchrun flags `tune run` passes through (either spelling, `--flag V` or `--flag=V`). Flags that
# change how the script is launched (-m, --no-python, --run-path) are left out on purpose.
LAUNCHER_OPTIONS = (
    "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port",
    "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_conf", "max_restarts",
    "monitor_interval", "start_method", "log_dir", "redirects", "tee", "local_ranks_filter",
)  # fmt: skip
LAUNCHER_SWITCHES = ("standalone",)

USAGE = "tune run [TORCHRUN FLAGS] RECIPE --config CONFIG [key=value | ~key ...]"


class HelpRequested(Exception):
    pass


@dataclass
class RunArgs:
    recipe: str
    config: str
    overrides: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)  # torchrun flags as the user wrote them


def parse_run_args(argv: list[str]) -> RunArgs:
    """Flags before RECIPE go to torchrun; `--config` may come anywhere; the rest are overrides."""
    recipe: str | None = None
    config: str | None = None
    overrides: list[str] = []
    launcher: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if tok in ("-h", "--help"):
            raise HelpRequested
        if name == "--config":
            if config is not None:
                raise UsageError("--config is given twice")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise UsageError("--config needs a value: a config name or a YAML file")
                i += 1
                value = argv[i]
            config = value
        elif tok.startswith("-") and recipe is None:
            flag = name.lstrip("-").replace("-", "_")
            if flag in LAUNCHER_SWITCHES:
                if eq:
                    raise UsageError(f"{name} takes no value")
                launcher.append(tok)
            elif flag in LAUNCHER_OPTIONS:
                if eq:
                    launcher.append(tok)
                elif i + 1 < len(argv):
                    launcher += [tok, argv[i + 1]]
                    i += 1
                else:
                    raise UsageError(f"{name} needs a value")
            else:
                known = [f"--{f}" for f in LAUNCHER_OPTIONS + LAUNCHER_SWITCHES]
                raise UsageError(
                    f"unknown option '{name}' for tune run{suggest('--' + flag, known)}; "
                    "see `tune run --help`"
                )
        elif recipe is None:
            recipe = tok
        elif tok.startswith("-"):
            raise UsageError(
                f"unexpected option '{name}' after the recipe: torchrun flags go before RECIPE "
                "and overrides look like key=value or ~key"
            )
        else:
            overrides.append(tok)
        i += 1
    if recipe is None:
        raise UsageError(f"missing RECIPE; usage: {USAGE}")
    if config is None:
        raise UsageError(f"missing --config CONFIG; usage: {USAGE}")
    return RunArgs(recipe, config, overrides, launcher)


def torchrun_argv(
    launcher: list[str], recipe_path: Path, config_path: Path, overrides: list[str]
) -> list[str]:
    """The command a distributed `tune run` executes; the recipe's `recipe_main` reads it."""
    return [
        sys.executable, "-m", "torch.distributed.run", *launcher,
        str(recipe_path), "--config", str(config_path), *overrides,
    ]  # fmt: skip


def check_recipe_matches(recipe: str, config_path: Path, config_label: str, overrides: list[str]):
    """A shipped recipe run with a config written for another recipe fails before any work."""
    wanted = recipe_of(config_path)
    for item in overrides:  # `recipe=X` or `~recipe` on the command line wins over the file
        if item.startswith("recipe="):
            wanted = item.split("=", 1)[1]
        elif item == "~recipe":
            wanted = None
    if wanted is not None and canonical(wanted) != recipe:
        raise UsageError(
            f"config {config_label} is for recipe '{wanted}', not '{recipe}': run "
            f"`tune run {wanted} --config {config_label}`, or add recipe={recipe} if you mean it"
        )


def cmd_run(argv: list[str]) -> int:
    args = parse_run_args(argv)
    recipe_path, recipe_name = find_recipe(args.recipe)
    config_path, config_name = find_config(args.config)
    if recipe_name is not None:
        check_recipe_matches(recipe_name, config_path, config_name or args.config, args.overrides)

    from tunewright.training.entry import import_recipe, load_recipe_config, run_recipe_file

    if not args.launcher:
        run_recipe_file(recipe_path, config_path, args.overrides)
        return 0
    load_recipe_config(import_recipe(recipe_path), config_path, args.overrides)
    cmd = torchrun_argv(args.launcher, recipe_path, config_path, args.overrides)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # does not return: torchrun owns the terminal and the exit status
    return 0  # pragma: no cover
