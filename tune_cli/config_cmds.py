"""`tune validate CONFIG [overrides]` and `tune cat CONFIG [overrides]`."""

from __future__ import annotations

from pathlib import Path

from tunewright.tune_cli.catalog import UsageError, find_config, find_recipe, recipe_names, suggest


def shipped_recipe_for_config(recipe: object, config_path: Path) -> Path | None:
    """The shipped recipe a config's `recipe:` value names (aliases too); None for a .py file.

    A config's `recipe: my_sft.py` is not imported on the config's say: importing runs the
    file, and a config is not trusted to choose code (`tune validate --recipe` names it)."""
    shipped = recipe_names()
    if not isinstance(recipe, str) or not recipe:
        raise UsageError(f"{config_path}: key 'recipe' must be a recipe name, got {recipe!r}")
    if recipe in shipped:
        return shipped[recipe]
    if recipe.endswith(".py"):
        return None
    raise UsageError(
        f"{config_path}: key 'recipe': unknown recipe '{recipe}'{suggest(recipe, list(shipped))}"
        "; `tune ls` lists the recipes"
    )


def cmd_validate(args) -> int:
    config_path, config_name = find_config(args.config)
    label = config_name or args.config

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.instantiate import components_allowed

    with components_allowed(args.allow_components.split(",") if args.allow_components else []):
        cfg = to_dict(load_config(config_path, args.overrides))
        if args.recipe is not None:
            recipe_path, recipe = find_recipe(args.recipe)[0], args.recipe  # named by the user
        elif cfg.get("recipe") is None:
            print(f"Config {label} loads and resolves, but has no 'recipe:' key, so its keys were "
                  "not checked against a recipe's schema (add `recipe: NAME`, or pass --recipe)")
            return 0
        else:
            recipe, recipe_path = cfg["recipe"], shipped_recipe_for_config(cfg["recipe"], config_path)
            if recipe_path is None:
                print(f"Config {label} loads and resolves; its recipe {recipe} is a Python file, which "
                      "tune validate does not run because a config names it, so its keys were not "
                      f"checked: `tune validate {args.config} --recipe FILE` checks them against FILE")
                return 0

        from tunewright.training.entry import import_recipe
        from tunewright.training.schema import validate

        validate(cfg, import_recipe(recipe_path).Config, str(config_path))
    print(f"Config is well-formed! {label} matches the schema of recipe {recipe}")
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
