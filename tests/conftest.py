"""Shared fixtures: a private cache for the generated tiny assets, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests generate the tiny model/dataset once per session into a cache of their own, never the
# user's, and never touch the network.
os.environ.setdefault("TUNEWRIGHT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-assets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO
