"""torchao's NF4 tensor (QLoRA's 4-bit NormalFloat base weights), imported defensively.

torchao moves its APIs between releases (0.15: `torchao.dtypes.nf4tensor`; 0.18:
`torchao.quantization.quantize_.workflows.nf4.nf4_tensor`), so we look in each known place.
"""

from __future__ import annotations

import importlib
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
    try:
        return isinstance(t, nf4_module().NF4Tensor)
    except ImportError:
        return False
