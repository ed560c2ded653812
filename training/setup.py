"""Process set-up shared by recipes: seeds, threads, device (dtypes: training/precision.py)."""

from __future__ import annotations

import os
import random

import torch


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


def set_deterministic(enabled: bool) -> bool:
    """Deterministic kernels (`deterministic: true`), returning the previous setting so it can be
    restored. On CPU every kernel tunewright uses already gives the same bits each run, which is
    what makes resume bit-exact; on a GPU some do not (`index_add_` and scatter sums use atomics,
    flash-attention's backward accumulates in a varying order), so GPU bit-exactness needs this,
    at some speed. cuBLAS needs its workspace fixed before its first call for the same reason."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    return previous
