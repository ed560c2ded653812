"""`tune validate CONFIG [overrides]` and `tune cat CONFIG [overrides]`."""

from __future__ import annotations

from pathlib import Path

from tunewright.tune_cli.catalog import UsageError, find_config, recipes, suggest


def recipe_for_config(recipe: object, config_path: Path) -> Path:
    """The file a config's `recipe:` value names: a shipped recipe, or a .py path taken relative
    to the config's folder first, then to the working directory."""
    shipped = recipes()
    if not isinstance(recipe, str) or not recipe:
        raise UsageError(f"{config_path}: key 'recipe' must be a recipe name, got {recipe!r}")
    if recipe in shipped:
        return shipped[recipe]
    if recipe.endswith(".py"):
        path = Path(recipe).expanduser()
        for candidate in ([path] if path.is_absolute() else [config_path.parent / path, path]):
            if candidate.is_file():
                return candidate.resolve()
        raise UsageError(f"{config_path}: recipe file not found: {recipe}")
    raise UsageError(
        f"{config_path}: key 'recipe': unknown recipe '{recipe}'{suggest(recipe, list(shipped))}"
        "; `tune ls` lists the recipes"
    )


def cmd_validate(args) -> int:
    config_path, config_name = find_config(args.config)
    label = config_name or args.config

    from tunewright.training.config import load_config, to_dict

    cfg = to_dict(load_config(config_path, args.overrides))
    if cfg.get("recipe") is None:
        print(
            f"Config {label} loads and resolves, but has no 'recipe:' key, so its keys were not "
            "checked against a recipe's schema (add `recipe: NAME` to check them)"
        )
        return 0
    recipe_path = recipe_for_config(cfg["recipe"], config_path)

    from tunewright.training.entry import import_recipe
    from tunewright.training.schema import validate

    validate(cfg, import_recipe(recipe_path).Config, str(config_path))
    print(f"Config is well-formed! {label} matches the schema of recipe {cfg['recipe']}")
    return 0


def cmd_cat(args) -> int:
    config_path, _ = find_config(args.config)
    if not args.overrides and not args.resolve:
        print(config_path.read_text(encoding="utf-8"), end="")  # as written, comments included
        return 0

    from omegaconf import OmegaConf

    from tunewright.training.config import load_config

    # Without --resolve, interpolations stay as written so the output can be used as a config.
    cfg = load_config(config_path, args.overrides, resolve_values=args.resolve)
    print(OmegaConf.to_yaml(cfg, resolve=args.resolve), end="")
    return 0
