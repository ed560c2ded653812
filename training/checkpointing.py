"""Step checkpoints for exact resume: trainable weights, optimizer, scheduler, data position, RNG.

Layout: `<output_dir>/checkpoints/step_<N>/` written atomically (temporary name, then rename),
so any `step_*` directory that exists is complete and `resume_from_checkpoint: auto` can take
the latest. Pickled files are read with `weights_only=True` only.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training.atomic import atomic_dir

WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "dcp"  # model + optimizer of a distributed run (training/dcp_checkpoint.py)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: bool | str) -> Path | None:
    """`false` -> None; `true`/`auto` -> latest step dir (None if there is none yet, so the same
    command starts or continues a run); a path -> that directory (must exist)."""
    if resume is False or resume in ("false", "no", "none", ""):
        return None
    if resume is True or resume in ("auto", "true", "latest"):
        found = step_dirs(output_dir)
        return found[-1][1] if found else None
    path = Path(str(resume))
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint directory "
                                f"(no {STATE_FILE})")
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    export: Callable[[Path], None] | None = None,
    keep_last: int | None = None,
) -> Path:
    from safetensors.torch import save_file

    final = checkpoints_dir(output_dir) / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
        if export is not None:
            export(tmp)  # e.g. a PEFT adapter or HF weights users can take from this step
    if keep_last:
        for _, old in step_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    step_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore weights and optimizer in place; return the trainer state (RNG already set)."""
    from safetensors.torch import load_file

    if (step_dir / SHARDED_DIR).is_dir():
        raise ValueError(f"{step_dir} is a sharded checkpoint of a distributed run; resume it with "
                         f"the distributed recipe (it also runs as a single process)")
    weights = load_file(str(step_dir / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        diff = sorted(set(weights) ^ trainable)[:3]
        raise ValueError(f"{step_dir}: checkpoint does not match this model's trainable "
                         f"parameters (differ: {', '.join(diff)}); was the config changed?")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(torch.load(step_dir / OPTIMIZER_FILE, weights_only=True))
    state = torch.load(step_dir / STATE_FILE, weights_only=True)
    set_rng_state(state.pop("rng"))
    return state
