"""Model transforms applied to a built model, in this order by every recipe:

1. adapters / quantization (`apply_lora`, `quantize_base_nf4`, ... in later modules)
2. `apply_activation_checkpointing`
3. `compile_blocks`

Each changes the model in place and keeps parameter names, so checkpoints and weight maps do not
care which transforms ran.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("model has no `layers`: transforms expect the generic decoder")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module, *, every: int = 1) -> None:
    """Recompute every `every`-th block's activations in backward instead of storing them.

    The block's `forward` is wrapped on the instance (not the module tree), so parameter names
    stay unchanged.
    """
    if every < 1:
        raise ValueError(f"activation_checkpointing_every={every}: must be >= 1")
    for i, block in enumerate(_blocks(model)):
        if i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each block separately: repeated blocks share one compiled graph, so
    compile time does not grow with depth."""
    for block in _blocks(model):
        block.compile()
