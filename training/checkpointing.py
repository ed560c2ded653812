"""Step checkpoints of a one-process run, for exact resume: every entry of a `TrainState`
(trainable weights of each model, each optimizer, schedulers, data positions), the run's step
and the RNG.

Layout, written atomically (a temporary name, then a rename), so any `step_*` directory that
exists is complete and `resume_from_checkpoint: auto` can take the latest:

    <output_dir>/checkpoints/step_<N>/
        <model>.trainable.safetensors   trainable parameters of each model of the state (our names)
        <optimizer>.pt                  each optimizer's state dict
        train_state.pt                  the run's counters, every other entry's state dict, RNG
        ...                             whatever `export(dir)` writes (e.g. the PEFT adapter of that step)

Pickled files are read with `weights_only=True` only.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.atomic import atomic_dir
from tunewright.training.state import TrainState

STATE_FILE = "train_state.pt"
SHARDED_DIR = "dcp"  # models + optimizers of a distributed run (training/dcp_checkpoint.py)
_STEP_DIR = re.compile(r"^step_(\d+)$")

Export = Callable[[Path], None]


def weights_file(model_name: str) -> str:
    return f"{model_name}.trainable.safetensors"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def prune(output_dir: str | Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step checkpoints (None or 0: keep all)."""
    if keep_last:
        for _, old in step_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


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


def object_states(state: TrainState) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in state.objects.items()}


def load_object_states(state: TrainState, saved: dict[str, Any], where: Path) -> None:
    missing = [name for name in state.objects if name not in saved]
    if missing:
        raise ValueError(f"{where}: the checkpoint has no '{missing[0]}' (it holds "
                         f"{', '.join(saved) or 'nothing else'}); was the recipe changed?")
    for name, obj in state.objects.items():
        obj.load_state_dict(saved[name])


def check_names(where: Path, what: str, saved: set[str], expected: set[str]) -> None:
    if saved != expected:
        diff = sorted(saved ^ expected)[:3]
        raise ValueError(f"{where}: checkpoint does not match {what}'s trainable parameters "
                         f"(differ: {', '.join(diff)}); was the config changed?")


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    state: TrainState,
    *,
    run_state: dict[str, Any],
    export: Export | None = None,
    keep_last: int | None = None,
) -> Path:
    from safetensors.torch import save_file

    final = checkpoints_dir(output_dir) / step_dir_name(step)
    with atomic_dir(final) as tmp:
        for name, model in state.models.items():
            save_file(trainable_state(model), str(tmp / weights_file(name)))
        for name, optimizer in state.optimizers.items():
            torch.save(optimizer.state_dict(), tmp / f"{name}.pt")
        torch.save({"run": run_state, "objects": object_states(state), "rng": rng_state()}, tmp / STATE_FILE)
        if export is not None:
            export(tmp)  # e.g. a PEFT adapter or HF weights users can take from this step
    prune(output_dir, keep_last)
    return final


def load_checkpoint(step_dir: Path, state: TrainState) -> dict[str, Any]:
    """Restore every entry of `state` in place and the RNG; return the run's saved counters."""
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    if (step_dir / SHARDED_DIR).is_dir():
        raise ValueError(f"{step_dir} is a sharded checkpoint of a distributed run; resume it with "
                         f"a distributed run (it also runs as a single process: distributed=true)")
    for name, model in state.models.items():
        path = step_dir / weights_file(name)
        if not path.is_file():
            raise ValueError(f"{step_dir}: the checkpoint has no model '{name}' ({path.name}); "
                             "was the recipe changed?")
        weights = load_file(str(path))
        params = dict(model.named_parameters())
        check_names(step_dir, f"model '{name}'", set(weights), {n for n, p in params.items() if p.requires_grad})
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
    for name, optimizer in state.optimizers.items():
        path = step_dir / f"{name}.pt"
        if not path.is_file():
            raise ValueError(f"{step_dir}: the checkpoint has no optimizer '{name}' ({path.name}); "
                             "was the recipe changed?")
        optimizer.load_state_dict(torch.load(path, weights_only=True))
    saved = torch.load(step_dir / STATE_FILE, weights_only=True)
    load_object_states(state, saved["objects"], step_dir)
    set_rng_state(saved["rng"])
    return saved["run"]


class LocalCheckpointer:
    """Step checkpoints as whole tensors written by rank 0 (the format above)."""

    def save(self, output_dir: str | Path, step: int, state: TrainState, *, run_state: dict[str, Any],
             export: Export | None = None, keep_last: int | None = None) -> Path | None:
        path = None
        if dist.is_main():
            path = save_checkpoint(output_dir, step, state, run_state=run_state, export=export,
                                   keep_last=keep_last)
        dist.barrier()
        return path

    def load(self, step_dir: Path, state: TrainState) -> dict[str, Any]:
        return load_checkpoint(step_dir, state)

    def wait(self) -> None:
        """Saves are synchronous: nothing is ever pending."""
