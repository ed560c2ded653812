"""Will it fit? The memory a run needs per process, before any weight is loaded.

    tune estimate --config llama3_1/8B_lora_single_device --device h100
    fits, lines = fit_report(cfg, device="h100")     # cfg: a recipe's Config

The model is built on the meta device from the config (`model.py`), its parameters counted in
the dtypes the run keeps them in, the optimizer's state from its table (`terms.py`), the
activations of one micro-batch measured by running forward on meta tensors (`activations.py`),
and the sum compared with the device (`report.py`), naming the biggest term and the change
that would make it fit. Every training run prints the same table at its start (`announce`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

# Imported inside the functions: `tune --help` imports this package (for the GPU table) and
# must not wait for torch.
__all__ = ["announce", "announce_for_prompts", "fit_report"]


def _estimate(cfg: Any, *, world_size: int, device_type: str, size: str | None) -> Any:
    from tunewright.training.estimate.devices import CUDA_CONTEXT
    from tunewright.training.estimate.terms import Term, estimate

    est = estimate(cfg, world_size=world_size, device_type=device_type, size=size)
    if device_type == "cuda":
        est.terms.append(Term("CUDA context", CUDA_CONTEXT, "context and allocator slack, about"))
    return est


def fit_report(cfg: Any, *, device: str = "cpu", world_size: int = 1, size: str | None = None,
           label: str | None = None, capacity: int | None = None, name: str | None = None) -> tuple[bool, list[str]]:
    """(fits, lines of the table and verdict) of `cfg` on `device` (cpu or a GPU name of
    `devices.GPUS`; or a `label` and `capacity` in bytes for the device at hand)."""
    from tunewright.training.estimate.devices import device_capacity
    from tunewright.training.estimate.report import table, verdict

    if capacity is None:
        label, capacity = device_capacity(device)
    device_type = "cpu" if device == "cpu" else "cuda"
    fn = partial(_estimate, device_type=device_type, size=size)
    est = fn(cfg, world_size=world_size)
    where = f"{world_size} processes" if world_size > 1 else "1 process"
    title = f"memory estimate: {name or cfg.recipe}, per process ({where}) on {label}"
    fits, lines = verdict(cfg, est, capacity=capacity, label=label, device_type=device_type,
                          world_size=world_size, estimate_fn=fn)
    return fits, table(est, title=title) + ["  " + line for line in lines]


def announce(cfg: Any) -> None:
    """Print the estimate at the start of a training run, on rank 0, for the device it runs
    on. An estimate that cannot be made is one line; it never stops the run."""
    import torch

    from tunewright.training import distributed as dist

    if not dist.is_main():
        return
    try:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
        if device.type == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            _, lines = fit_report(cfg, device="cuda", world_size=dist.world_size(), label=props.name,
                              capacity=props.total_memory)
        else:
            _, lines = fit_report(cfg, device="cpu", world_size=dist.world_size())
    except (ValueError, OSError, RuntimeError, NotImplementedError, KeyError, AttributeError, TypeError) as e:
        # An estimate is advice: a shape it cannot work out is said, and the run goes on.
        print(f"memory estimate: not available ({str(e).splitlines()[0] if str(e) else type(e).__name__})", flush=True)
        return
    print("\n".join(lines), flush=True)


def announce_for_prompts(cfg: Any, prompts: Any) -> None:
    """`announce` for a run that generates from `prompts` (a `PromptDataset`: GRPO, PPO): the
    rows it trains on are its longest prompt plus max_new_tokens, not the tokenizer's whole
    context, which a config without `dataset.max_prompt_len` would otherwise have to assume
    (an estimate 20x too high for short prompts)."""
    import dataclasses

    items = getattr(prompts, "items", None)  # a data set of another kind: the config's bound
    longest = max((len(item["prompt_ids"]) for item in items), default=0) if isinstance(items, list) else 0
    if longest and isinstance(cfg.dataset, dict):
        cfg = dataclasses.replace(cfg, dataset={**cfg.dataset, "max_prompt_len": longest})
    announce(cfg)
