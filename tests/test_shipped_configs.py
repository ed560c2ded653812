"""Every shipped config loads, resolves and validates against the schema of its recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunewright.training.config import load_config, to_dict
from tunewright.training.entry import import_recipe
from tunewright.training.schema import validate

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs_and_every_recipe_has_a_tiny_one():
    assert CONFIGS
    recipes = {p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_")}
    with_tiny = set()
    for path in CONFIGS:
        cfg = load_config(path) if "tiny" in path.stem else None
        if cfg is not None:
            with_tiny.add(cfg["recipe"])
    assert recipes - {"generate"} <= with_tiny, f"recipes without a tiny config: {recipes - with_tiny}"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = to_dict(load_config(path))
    assert "recipe" in cfg, f"{path} must say which recipe it is for"
    module = import_recipe(REPO / "recipes" / f"{cfg['recipe']}.py")
    validate(cfg, module.Config, str(path))


NAMES = {p.relative_to(REPO / "configs").with_suffix("").as_posix(): p for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_config_names_say_where_they_run(name):
    # torchtune's naming: <size>_<method>_single_device | _distributed; tiny_* (every recipe's
    # seconds-long config) and the quickstart's are named for what they are.
    stem = name.split("/")[1]
    assert re.fullmatch(r"tiny_\w+|[\w.]+_(single_device|distributed|quickstart)", stem), name


def test_the_commands_in_config_headers_name_shipped_configs():
    for name, path in NAMES.items():
        for mentioned in re.findall(r"--config (\S+)", path.read_text(encoding="utf-8")):
            assert mentioned in NAMES, f"{name} mentions --config {mentioned}, which is not shipped"
