"""The estimate as a table, the device it is compared with, and what would make it fit."""

from __future__ import annotations

import math
from typing import Any, Callable

from tunewright.training.estimate.devices import human
from tunewright.training.estimate.terms import Estimate, Term, with_changes

def table(est: Estimate, *, title: str) -> list[str]:
    width = max(len(t.name) for t in est.terms) if est.terms else 10
    lines = [title]
    for t in est.terms:
        host = f" (+{human(t.host_bytes)} in host memory)" if t.host_bytes else ""
        lines.append(f"  {t.name:<{width}}  {human(t.bytes):>10}  {t.note}{host}")
    lines.append(f"  {'total':<{width}}  {human(est.total):>10}" +
                 (f"  (+{human(est.host_total)} in host memory)" if est.host_total else ""))
    if est.loading:
        lines.append(f"  {'loading':<{width}}  {human(est.loading):>10}  before training: the weights as read and the "
                     "checkpoint file's pages; the peak is the larger of this and the total")
    lines.extend(f"  note: {n}" for n in est.notes)
    return lines


def fixes(cfg: Any, biggest: Term, *, device_type: str) -> list[dict[str, Any]]:
    """Config changes that shrink the biggest term, mildest first."""
    lora = getattr(cfg, "lora_rank", None) is not None
    ckpt = getattr(cfg, "enable_activation_checkpointing", False)
    out: list[dict[str, Any]] = []
    if biggest.name in ("activations", "logits / loss chunks"):
        if not ckpt and hasattr(cfg, "enable_activation_checkpointing"):
            out.append({"enable_activation_checkpointing": True})
        if device_type == "cuda" and not getattr(cfg, "enable_activation_offloading", True):
            out.append({"enable_activation_checkpointing": True, "enable_activation_offloading": True})
        if getattr(cfg, "batch_size", 1) > 1 and hasattr(cfg, "gradient_accumulation_steps"):
            out.append({"enable_activation_checkpointing": True, "batch_size": 1,
                        "gradient_accumulation_steps": cfg.gradient_accumulation_steps * cfg.batch_size})
    if hasattr(cfg, "lora_rank") and not lora:
        out.append({"lora_rank": 16})
        out.append({"lora_rank": 16, "quantize_base": True})
    elif lora and not getattr(cfg, "quantize_base", True):
        out.append({"quantize_base": True})
    if out and hasattr(cfg, "enable_activation_checkpointing") and not ckpt:
        out.append({**out[-1], "enable_activation_checkpointing": True})
    return out


def verdict(cfg: Any, est: Estimate, *, capacity: int, label: str, device_type: str, world_size: int,
            estimate_fn: Callable[..., Estimate]) -> tuple[bool, list[str]]:
    """(fits, lines): whether `est` fits in `capacity` bytes, and if not, its biggest term and
    the first change (re-estimated) that makes it fit."""
    total = est.peak
    if total <= capacity:
        return True, [f"fits on {label}: {human(total)} of {human(capacity)} ({100 * total / capacity:.0f}%)"]
    big = est.biggest()
    lines = [f"does not fit on {label}: {human(total)} needed, {human(capacity)} there; "
             f"biggest term: {big.name} ({human(big.bytes)})"]
    for change in fixes(cfg, big, device_type=device_type):
        try:
            trial = estimate_fn(with_changes(cfg, **change), world_size=world_size)
        except ValueError:
            continue
        if trial.peak <= capacity:
            keys = " ".join(f"{k}={_yaml(v)}" for k, v in change.items())
            lines.append(f"would fit with {keys} ({human(trial.peak)})")
            return False, lines
    if device_type == "cuda" and hasattr(cfg, "distributed"):
        for n in (2, 4, 8, 16, 32, 64, 128):
            if n > world_size and estimate_fn(cfg, world_size=n).peak <= capacity:
                lines.append(f"would fit with FSDP over {n} GPUs (tune run --nproc_per_node {min(n, 8)}"
                             f"{f' --nnodes {math.ceil(n / 8)}' if n > 8 else ''} ...)")
                return False, lines
    lines.append("no single change tried (activation checkpointing, LoRA, QLoRA, batch_size 1, FSDP up to "
                 "128 GPUs) makes it fit")
    return False, lines


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
