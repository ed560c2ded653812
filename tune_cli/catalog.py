"""The shipped recipes and configs, found by plain paths: `tune ls` and `tune cp`.

Recipes are `recipes/<name>.py` and configs `configs/<family>/<name>.yaml` (named
`<family>/<name>`) inside the installed `tunewright` package, for editable and wheel installs
alike. Nothing here imports torch or OmegaConf: a config's recipe is read from its top-level
`recipe:` line with a text scan, so `tune ls` answers at once.
"""

from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

import tunewright
from tunewright.training.errors import ConfigError

# Tests point this at a fixture tree with `recipes/` and `configs/` folders.
ROOT = Path(tunewright.__file__).resolve().parent

_RECIPE_LINE = re.compile(r"""^recipe\s*:\s*(?:"([^"]*)"|'([^']*)'|([^\s#]+))""")


class UsageError(ConfigError):
    """Bad input to a `tune` command; the message is one actionable line."""


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"


# torchtune's recipe names: one `sft` recipe runs full and LoRA fine-tuning on one device or
# many (the config decides), so these names take users and their configs there.
ALIASES = {
    "full_finetune_single_device": "sft", "lora_finetune_single_device": "sft",
    "full_finetune_distributed": "sft", "lora_finetune_distributed": "sft",
    "lora_dpo_single_device": "dpo", "lora_dpo_distributed": "dpo", "full_dpo_distributed": "dpo",
    "grpo_full_finetune_distributed": "grpo",  # torchtune's dev/ GRPO recipe
    "ppo_full_finetune_single_device": "ppo",  # torchtune's PPO recipe
    "knowledge_distillation_single_device": "knowledge_distillation",
    "knowledge_distillation_distributed": "knowledge_distillation",
    # Quantization-aware training is sft with a `quantization:` node.
    "qat": "sft", "qat_single_device": "sft", "qat_distributed": "sft", "qat_lora_finetune_distributed": "sft",
}


def canonical(name: str) -> str:
    """The recipe a name runs: itself, or what an alias stands for when no recipe has its name."""
    return name if name in recipes() else ALIASES.get(name, name)


def recipes() -> dict[str, Path]:
    """Recipe name -> file; files starting with `_` are helpers, not recipes."""
    folder = ROOT / "recipes"
    files = sorted(folder.glob("*.py")) if folder.is_dir() else []
    return {p.stem: p for p in files if not p.name.startswith("_")}


def recipe_names() -> dict[str, Path]:
    """`recipes()` plus the aliases of those that exist."""
    found = recipes()
    return {**{a: found[r] for a, r in ALIASES.items() if r in found}, **found}


def configs() -> dict[str, Path]:
    """Config name (`llama/tiny_full`) -> file."""
    folder = ROOT / "configs"
    files = sorted(folder.rglob("*.yaml")) if folder.is_dir() else []
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in files}


def recipe_of(config_path: Path) -> str | None:
    """The value of a config's top-level `recipe:` key, without parsing the YAML."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        m = _RECIPE_LINE.match(line)
        if m:
            return next(g for g in m.groups() if g is not None)
    return None


def find_recipe(arg: str) -> tuple[Path, str | None]:
    """A recipe argument -> (file, shipped name or None when it was given as a path)."""
    shipped = recipe_names()
    if arg in shipped:
        return shipped[arg], canonical(arg)
    path = Path(arg).expanduser()
    if path.is_file():
        return path.resolve(), None
    if path.name and path.with_name(path.name + ".py").is_file():
        raise UsageError(f"no recipe '{arg}' (did you mean the file '{arg}.py'?)")
    if arg.endswith(".py") or "/" in arg or "\\" in arg:
        raise UsageError(f"recipe file not found: {arg}{suggest(path.stem, list(shipped))}")
    raise UsageError(
        f"unknown recipe '{arg}'{suggest(arg, list(shipped))}; `tune ls` lists the recipes, "
        "or pass a path to a .py file"
    )


def find_config(arg: str) -> tuple[Path, str | None]:
    """A config argument -> (file, shipped name or None). A file on disk wins over a name."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path.resolve(), None
    shipped = configs()
    name = arg[: -len(".yaml")] if arg.endswith(".yaml") else arg
    if name in shipped:
        return shipped[name], name
    if arg.endswith((".yaml", ".yml")):
        raise UsageError(f"config file not found: {arg}{suggest(name, list(shipped))}")
    if path.name and path.with_name(path.name + ".yaml").is_file():
        raise UsageError(f"no config '{arg}' (did you mean the file '{arg}.yaml'?)")
    raise UsageError(
        f"unknown config '{arg}'{suggest(name, list(shipped))}; `tune ls` lists the configs, "
        "or pass a path to a YAML file"
    )


def cmd_ls(args) -> int:
    shipped_recipes = recipes()
    by_recipe: dict[str, list[str]] = {name: [] for name in shipped_recipes}
    orphans: dict[str, list[str]] = {}
    for name, path in configs().items():
        recipe = recipe_of(path)
        if recipe not in by_recipe and recipe in ALIASES:
            recipe = ALIASES[recipe]
        if recipe in by_recipe:
            by_recipe[recipe].append(name)
        else:
            label = f"{recipe} (no such recipe)" if recipe else "(no recipe: key)"
            orphans.setdefault(label, []).append(name)
    rows = list(by_recipe.items()) + list(orphans.items())
    width = max([len("RECIPE"), *(len(r) for r, _ in rows)]) + 4
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, names in rows:
        print(f"{recipe:<{width}}{names[0] if names else ''}".rstrip())
        for name in names[1:]:
            print(f"{'':<{width}}{name}")
    if not rows:
        print(f"(nothing shipped under {ROOT})")
    aliases: dict[str, list[str]] = {}  # recipe -> the other names that run it
    for alias, target in sorted(ALIASES.items()):
        if target in shipped_recipes and alias not in shipped_recipes:
            aliases.setdefault(target, []).append(alias)
    if aliases:
        print("\nOther names (torchtune's, and qat):")
        for target, names in sorted(aliases.items()):
            print(f"  {', '.join(names)} -> {target}")
    return 0


def cmd_cp(args) -> int:
    shipped_recipes, shipped_configs = recipe_names(), configs()
    if args.name in shipped_recipes:
        src, suffix = shipped_recipes[args.name], ".py"
    elif args.name in shipped_configs:
        src, suffix = shipped_configs[args.name], ".yaml"
    else:
        options = list(shipped_recipes) + list(shipped_configs)
        raise UsageError(
            f"unknown recipe or config '{args.name}'{suggest(args.name, options)}; "
            "`tune ls` lists them"
        )
    dest = Path(args.dest).expanduser()
    if dest.is_dir():
        dest = dest / src.name
    elif args.dest.endswith(("/", "\\")):
        if not args.make_parents:
            raise UsageError(f"directory {args.dest} does not exist (--make-parents creates it)")
        dest = dest / src.name
    elif not dest.suffix:
        dest = dest.with_suffix(suffix)  # torchtune's habit: `tune cp NAME my_copy`
    if dest.exists() and not args.force:
        raise UsageError(f"{dest} already exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        if not args.make_parents:
            raise UsageError(
                f"directory {dest.parent} does not exist (--make-parents creates it)"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"Copied {args.name} to {dest}")
    return 0
