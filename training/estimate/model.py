"""The models a run builds, on the meta device, and the bytes their parameters take.

No weight is read: the shape comes from `model.path`'s config.json, or, where that directory is
not there yet (a config read before `tune download`), from the family size table row its name
spells (`/tmp/Meta-Llama-3.1-8B-Instruct` -> `llama3_1_8b`), or from `size=` when given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunewright.models.args import ModelArgs

# torchao NF4 (QLoRA): 4 bits per weight, an int8 scale per block of 64 weights, a scale of those
# scales per block of 256 (`modules/peft/qlora.py` BLOCK_SIZE, SCALER_BLOCK_SIZE).
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def _alnum(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def size_from_name(path: str) -> str | None:
    """The size table row whose name the directory's name spells, the longest such (so
    `Phi-4-mini-instruct` is `phi4_mini`, not `phi4`); None if none does."""
    from tunewright.models.registry import all_families

    name = _alnum(Path(path).name)
    found = [size for family in all_families() for size in family.sizes if _alnum(size) in name]
    return max(found, key=lambda s: len(_alnum(s)), default=None)


def model_args(model_cfg: dict[str, Any], *, size: str | None = None, key: str = "model") -> tuple[ModelArgs, str]:
    """(shape, where it came from) of a config's model node."""
    from tunewright.models.registry import find_size, model_args as read_args
    from tunewright.models.score import with_num_labels

    path = model_cfg.get("path")
    if size is None and path is not None and (Path(path) / "config.json").is_file():
        _, args = read_args(path)
        source = f"{path}/config.json"
    else:
        size = size or (size_from_name(str(path)) if path is not None else None)
        if size is None:
            raise ValueError(f"{key}.path: {path} has no config.json and its name spells no known size; "
                             "download the model first, or name its size (tune estimate --model-size NAME)")
        _, args = find_size(size)
        source = f"size table row {size}" + (f" ({path} not downloaded)" if path is not None else "")
    if model_cfg.get("num_labels") is not None:
        args = with_num_labels(args, model_cfg["num_labels"], Path(path or "."))
    return args, source


@dataclass
class ParamBytes:
    """A built model's parameters: counts and the bytes they take as the run stores them."""

    trainable: int  # parameters that train
    frozen: int  # parameters that do not
    trainable_bytes: int  # in the master dtype
    frozen_bytes: int  # in the compute dtype, NF4 where QLoRA quantizes
    nf4: int  # frozen parameters stored in NF4
    largest_trainable: int  # elements of the biggest trainable tensor (optimizer in backward)
    trainable_tensors: int  # how many (one optimizer `step` scalar each)


def nf4_bytes(numel: int, itemsize: int) -> int:
    """torchao's NF4Tensor of `numel` weights quantized from a dtype of `itemsize` bytes: packed
    4-bit codes, int8 block scales, second-level scales (`quantize_base_nf4` picks the scaler
    block that divides), their mean and the 16-value code book, those three in that dtype."""
    import math

    blocks = numel // NF4_BLOCK
    scaler_block = math.gcd(blocks, NF4_SCALER_BLOCK)
    return numel // 2 + blocks + itemsize * (blocks // scaler_block + 1 + 16)


def build_meta(args: ModelArgs, cfg: Any, *, adapters: bool) -> nn.Module:
    """The model on the meta device, with the run's LoRA adapters when `adapters` (every
    other weight frozen, as `apply_lora` leaves it)."""
    from tunewright.models.pretrained import build_model

    model = build_model(args, device="meta")
    if adapters:
        from tunewright.training.lora_setup import add_lora

        add_lora(model, cfg)
    return model


def param_bytes(model: nn.Module, *, master: torch.dtype, compute: torch.dtype, quantize_base: bool,
                trains: bool = True) -> ParamBytes:
    """What the run keeps of `model`'s parameters: trainable ones in `master`, frozen ones in
    `compute` (training/precision.py); with `quantize_base`, the frozen base weight of every
    LoRA layer in NF4. `trains=False`: a frozen copy (a teacher or reference), all in `compute`."""
    from tunewright.modules.peft.apply import lora_modules

    nf4_ids = {id(m.weight) for _, m in lora_modules(model)} if quantize_base else set()
    out = ParamBytes(0, 0, 0, 0, 0, 0, 0)
    for p in model.parameters():
        n = p.numel()
        if trains and p.requires_grad:
            out.trainable += n
            out.trainable_bytes += n * master.itemsize
            out.largest_trainable = max(out.largest_trainable, n)
            out.trainable_tensors += 1
        elif id(p) in nf4_ids:
            out.frozen += n
            out.nf4 += n
            out.frozen_bytes += nf4_bytes(n, compute.itemsize)
        else:
            out.frozen += n
            out.frozen_bytes += n * compute.itemsize
    return out
