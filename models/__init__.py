"""Models: `load_pretrained`, `save_pretrained`, `build_model` and the family registry.

Imports are lazy (module `__getattr__`) so that `import tunewright.models` costs nothing until a
function is used; the CLI stays fast.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_pretrained": "tunewright.models.pretrained",
    "save_pretrained": "tunewright.models.pretrained",
    "build_model": "tunewright.models.pretrained",
    "ModelArgs": "tunewright.models.args",
    "find_size": "tunewright.models.registry",
    "get_family": "tunewright.models.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tunewright.models' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
