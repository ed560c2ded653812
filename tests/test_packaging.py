"""pyproject's explicit package list covers every package folder, so a wheel install has them."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"tunewright"}
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and rel.parts[0] in (".venv", ".cache", "tests", "bench", "out", "build"):
            continue
        if rel.parts:
            found.add("tunewright." + ".".join(rel.parts))
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_configs_ship_as_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data["tunewright.configs"] == ["**/*.yaml", "eval_tasks/*.json", "eval_tasks/*.jsonl"]
    assert list((REPO / "configs").rglob("*.yaml"))
    # eleuther_eval's local tasks: a JSON spec and its JSONL rows, all matched by those globs
    tasks = sorted(p.name for p in (REPO / "configs" / "eval_tasks").iterdir() if p.is_file())
    assert tasks and all(name.endswith((".json", ".jsonl")) for name in tasks), tasks
