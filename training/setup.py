"""Process set-up shared by recipes: seeds, threads, device, dtype."""

from __future__ import annotations

import random

import torch

from tunewright.models.pretrained import as_dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup_device(device: str, num_threads: int | None) -> torch.device:
    if num_threads:
        torch.set_num_threads(num_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no GPU is available (set device=cpu)")
    return dev


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = as_dtype(name)
    if dtype == torch.float16:
        raise ValueError("dtype: fp16 training needs loss scaling, which is not supported; use bf16 or fp32")
    return dtype
