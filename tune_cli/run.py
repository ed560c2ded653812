"""`tune run [TORCHRUN FLAGS] RECIPE --config CONFIG [key=value | ~key ...]`.

Without torchrun flags the recipe runs in this process through `run_recipe_file`. With them,
`tune` runs torchrun (`tune_cli/launch.py`: `torch.distributed.run`, quiet on Ctrl-C) as a child
it waits for, with `recipe.py --config CFG ...`, and each worker's `recipe_main` loads the
config; the config and the flags' values are checked here first, so that a typo prints one line
instead of one per worker plus torchrun's failure report. Ctrl-C (or SIGTERM) is passed to the
child, which stops the workers; `tune` then prints one line and exits 130 (143).

`--allow-components PKG[,PKG]` (anywhere before the overrides) lets the config call
`_component_`s of packages outside tunewright, torch and torchao (`training/instantiate.py`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunewright.tune_cli.catalog import UsageError, canonical, find_config, find_recipe, recipe_of, suggest

# torchrun flags `tune run` passes through (either spelling, `--flag V` or `--flag=V`). Flags that
# change how the script is launched (-m, --no-python, --run-path) are left out on purpose.
LAUNCHER_OPTIONS = (
    "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port",
    "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_conf", "max_restarts",
    "monitor_interval", "start_method", "log_dir", "redirects", "tee", "local_ranks_filter",
)  # fmt: skip
LAUNCHER_SWITCHES = ("standalone",)


def _integer(low: int, high: int | None = None) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and low <= int(v) and (high is None or int(v) <= high)


def _positive_number(v: str) -> bool:
    try:
        return float(v) > 0
    except ValueError:
        return False


def _nnodes(v: str) -> bool:
    parts = v.split(":")
    return len(parts) <= 2 and all(_integer(1)(p) for p in parts) and int(parts[0]) <= int(parts[-1])


_STD = re.compile(r"[0-3]|\d+:[0-3](,\d+:[0-3])*")  # torchrun's Std: one value, or rank:value pairs
# What torchrun accepts for each flag's value, checked before it starts (it would print a
# traceback per bad value, after importing torch); flags not listed take any text.
LAUNCHER_VALUES: dict[str, tuple[Callable[[str], bool], str]] = {
    "nproc_per_node": (lambda v: _integer(1)(v) or v in ("auto", "cpu", "gpu", "xpu"),
                       "a number of processes per node >= 1, or auto, cpu, gpu, xpu"),
    "nnodes": (_nnodes, "a number of nodes >= 1, or MIN:MAX"),
    "node_rank": (_integer(0), "this node's index, >= 0"),
    "master_port": (_integer(1, 65535), "a port number, 1 to 65535"),
    "max_restarts": (_integer(0), "a number >= 0"),
    "monitor_interval": (_positive_number, "a number of seconds > 0"),
    "start_method": (lambda v: v in ("spawn", "fork", "forkserver"), "spawn, fork or forkserver"),
    "redirects": (lambda v: bool(_STD.fullmatch(v)), "0-3, or LOCAL_RANK:0-3 pairs such as 0:3,1:0"),
    "tee": (lambda v: bool(_STD.fullmatch(v)), "0-3, or LOCAL_RANK:0-3 pairs such as 0:3,1:0"),
    "local_ranks_filter": (lambda v: bool(re.fullmatch(r"\d+(,\d+)*", v)), "local ranks such as 0 or 0,1"),
}


def check_launcher_value(name: str, value: str) -> None:
    """One line for a torchrun flag value torchrun would reject (`--nproc_per_node abc`)."""
    flag = name.lstrip("-").replace("-", "_")
    ok, wanted = LAUNCHER_VALUES.get(flag, (lambda v: bool(v.strip()), "a value"))
    if not ok(value):
        raise UsageError(f"{name} {value!r}: must be {wanted} (a torchrun flag; see `tune run --help`)")

USAGE = "tune run [TORCHRUN FLAGS] RECIPE --config CONFIG [key=value | ~key ...]"


class HelpRequested(Exception):
    pass


@dataclass
class RunArgs:
    recipe: str
    config: str
    overrides: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)  # torchrun flags as the user wrote them
    allow_components: list[str] = field(default_factory=list)  # --allow-components, split at ","


def parse_run_args(argv: list[str]) -> RunArgs:
    """Flags before RECIPE go to torchrun; `--config` may come anywhere; the rest are overrides."""
    recipe: str | None = None
    config: str | None = None
    overrides: list[str] = []
    launcher: list[str] = []
    allow: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if tok in ("-h", "--help"):
            raise HelpRequested
        if name in ("--config", "--allow-components", "--allow_components"):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    what = "a config name or a YAML file" if name == "--config" else "packages such as mypkg"
                    raise UsageError(f"{name} needs a value: {what}")
                i += 1
                value = argv[i]
            if name != "--config":
                allow += [p for p in value.split(",") if p.strip()]
            elif config is not None:
                raise UsageError("--config is given twice")
            else:
                config = value
        elif tok.startswith("-") and recipe is None:
            flag = name.lstrip("-").replace("-", "_")
            if flag in LAUNCHER_SWITCHES:
                if eq:
                    raise UsageError(f"{name} takes no value")
                launcher.append(tok)
            elif flag in LAUNCHER_OPTIONS:
                if not eq:
                    if i + 1 >= len(argv):
                        raise UsageError(f"{name} needs a value")
                    i += 1
                    value = argv[i]
                check_launcher_value(name, value)
                launcher += [tok] if eq else [tok, value]
            else:
                known = [f"--{f}" for f in LAUNCHER_OPTIONS + LAUNCHER_SWITCHES] + ["--allow-components"]
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
    return RunArgs(recipe, config, overrides, launcher, allow)


def torchrun_argv(
    launcher: list[str], recipe_path: Path, config_path: Path, overrides: list[str]
) -> list[str]:
    """The command a distributed `tune run` starts; the recipe's `recipe_main` reads it."""
    return [
        sys.executable, "-m", "tunewright.tune_cli.launch", *launcher,
        str(recipe_path), "--config", str(config_path), *overrides,
    ]  # fmt: skip


def launch(cmd: list[str]) -> int:
    """Run `cmd` (torchrun) and wait for it. The first SIGINT or SIGTERM this process gets is
    passed on (Ctrl-C in a terminal reaches the child too: it stops once) and ends in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, forward) for sig in handled} if in_main else {}
    try:
        child = subprocess.Popen(cmd)
        if received:  # it came while the child was starting
            child.send_signal(received[0])
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        what = "interrupted" if received[0] == signal.SIGINT else "terminated"
        print(f"error: {what}: stopped torchrun and its workers", file=sys.stderr)
        return 128 + received[0]
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


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
    from tunewright.training.instantiate import components_allowed

    with components_allowed(args.allow_components):  # the workers inherit it
        if not args.launcher:
            run_recipe_file(recipe_path, config_path, args.overrides)
            return 0
        load_recipe_config(import_recipe(recipe_path), config_path, args.overrides)
        return launch(torchrun_argv(args.launcher, recipe_path, config_path, args.overrides))
