"""Process set-up shared by recipes: seeds, threads, device, dtype."""

from __future__ import annotations

import random

import torch

from tunewright.models.pretrained import as_dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup_device(device: str, num_threads: int | None) -> torch.device:
    """The torch device `device` names, checked to exist here (the schema checks its form)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:  # a form torch does not know, e.g. from `tune chat --device`
        raise ValueError(f"device: '{device}' is not a device (use cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = backend is not None and backend.is_available()
    if not available:
        what = "no GPU is available" if dev.type == "cuda" else f"{dev.type} is not available here"
        raise ValueError(f"device: {device} was asked for but {what} (set device=cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device: {device} was asked for but this machine has {count} {dev.type} "
                         f"device(s), numbered from 0")
    return dev


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = as_dtype(name)
    if dtype == torch.float16:
        raise ValueError("dtype: fp16 training needs loss scaling, which is not supported; use bf16 or fp32")
    return dtype
