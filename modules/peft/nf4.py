"""torchao's NF4 tensor (QLoRA's 4-bit NormalFloat base weights), imported defensively.

torchao moves its APIs between releases (0.15: `torchao.dtypes.nf4tensor`; 0.18:
`torchao.quantization.quantize_.workflows.nf4.nf4_tensor`), so we look in each known place.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_LOCATIONS = (
    "torchao.dtypes.nf4tensor",
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
)


def nf4_module() -> ModuleType:
    errors = []
    for name in _LOCATIONS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if all(hasattr(module, a) for a in ("to_nf4", "linear_nf4", "NF4Tensor")):
            return module
    raise ImportError("QLoRA needs torchao's NF4 tensor (pip install torchao); tried " + "; ".join(errors))


def is_nf4(t: object) -> bool:
    # Only look where torchao is already imported: no NF4 tensor can exist otherwise, and plain
    # LoRA must not pay torchao's import (seconds, and noisy) just to ask.
    for name in _LOCATIONS:
        module = sys.modules.get(name)
        if module is not None and isinstance(t, getattr(module, "NF4Tensor", ())):
            return True
    return False
