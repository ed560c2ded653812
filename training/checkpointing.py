"""Step checkpoints of a one-process run, for exact resume: every entry of a `TrainState`
(trainable weights of each model, each optimizer, schedulers, data positions), the run's step
and the RNG.

Layout, written atomically (a temporary name, then a rename, after checking the free space), so
any `step_*` directory that exists was complete when written; `resume_from_checkpoint: auto`
takes the latest that still is (`resume_candidates`: a truncated or missing file sets it aside
as `step_<N>.damaged` and the one before is used):

    <output_dir>/checkpoints/step_<N>/
        <model>.trainable.safetensors   trainable parameters of each model of the state (our names)
        <optimizer>.pt                  each optimizer's state dict
        train_state.pt                  the run's counters, every other entry's state dict, RNG
        ...                             whatever `export(dir)` writes (e.g. the PEFT adapter of that step)

Pickled files are read with `weights_only=True` only. A checkpoint's tensors that do not fit
the model (a changed shape) are named with the key that changes them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.atomic import atomic_dir, tensor_bytes
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
    """`false` -> None; `true`/`auto` -> the latest complete step dir (None if there is none yet,
    so the same command starts or continues a run); a path -> that directory (must exist)."""
    found, _ = resume_candidates(output_dir, resume, set_aside=False)
    return found[0] if found else None


def wants_resume(resume: bool | str) -> bool:
    return not (resume is False or resume in ("false", "no", "none", ""))


def resume_candidates(output_dir: str | Path, resume: bool | str, *,
                      set_aside: bool = True) -> tuple[list[Path], list[str]]:
    """The checkpoints to resume from, best first, and what to tell the user. `auto`: every
    complete step dir, newest first; the damaged ones newer than the newest complete one are
    renamed `step_<N>.damaged` (with `set_aside`), so neither resume nor pruning takes them. An
    explicit path: just that one (an error if it is not a checkpoint or is damaged)."""
    if not wants_resume(resume):
        return [], []
    if not (resume is True or resume in ("auto", "true", "latest")):
        path = Path(str(resume))
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint directory "
                                    f"(no {STATE_FILE})")
        if (problem := checkpoint_damage(path)) is not None:
            raise ValueError(f"resume_from_checkpoint: {path} is damaged: {problem}")
        return [path], []
    complete, damaged = [], []
    for _, step_dir in reversed(step_dirs(output_dir)):
        problem = checkpoint_damage(step_dir)
        if problem is None:
            complete.append(step_dir)
        elif not complete:
            damaged.append((step_dir, problem))
    if damaged and not complete:
        newest, problem = damaged[0]
        raise ValueError(f"resume_from_checkpoint: auto: no complete checkpoint in {checkpoints_dir(output_dir)} "
                         f"({newest.name}: {problem}); resume from a copy, or start over with "
                         "overwrite_output_dir=true")
    notes = []
    for step_dir, problem in damaged:
        aside = step_dir.with_name(f"{step_dir.name}.damaged")
        if set_aside:
            os.rename(step_dir, aside)
        notes.append(f"resume_from_checkpoint: auto: {step_dir.name} is damaged ({problem}); set aside as "
                     f"{aside.name}, falling back to {complete[0].name}")
    return complete, notes


def checkpoint_damage(step_dir: Path) -> str | None:
    """Why `step_dir` cannot be a whole checkpoint (its state file missing, a file truncated or
    unreadable), or None. Cheap: headers, sizes and archive directories, never the tensors."""
    if not (step_dir / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_damage(path)
        elif path.suffix == ".pt":
            try:
                with zipfile.ZipFile(path):  # torch.save's archive: its directory is at the end
                    pass
            except (zipfile.BadZipFile, OSError) as e:
                problem = f"unreadable ({e})"
        if problem is not None:
            return f"{path.relative_to(step_dir)} is {problem}"
    if (step_dir / SHARDED_DIR).is_dir():
        return _dcp_damage(step_dir / SHARDED_DIR)
    return None


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 + header_len:
                return f"truncated ({size} bytes, its header alone needs {8 + header_len})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        return f"truncated ({size} bytes of {8 + header_len + end})"
    return None


def _dcp_damage(dcp_dir: Path) -> str | None:
    """Every shard file DCP's metadata names exists and reaches the last byte it indexes."""
    if not (dcp_dir / ".metadata").is_file():
        return f"{SHARDED_DIR}/.metadata is missing"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(dcp_dir)).read_metadata().storage_data or {}
    except Exception as e:  # an unreadable pickle of DCP's own metadata: the file is damaged
        return f"{SHARDED_DIR}/.metadata is unreadable ({e})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = dcp_dir / name
        if not path.is_file():
            return f"{SHARDED_DIR}/{name} is missing"
        if path.stat().st_size < end:
            return f"{SHARDED_DIR}/{name} is truncated ({path.stat().st_size} bytes of {end})"
    return None


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


def rank_object_states(state: TrainState) -> dict[str, Any]:
    """The entries that differ between ranks (`per_rank = True`, e.g. a sampling generator
    seeded by rank): a sharded checkpoint keeps them per rank, beside that rank's RNG."""
    return {name: obj.state_dict() for name, obj in state.objects.items() if getattr(obj, "per_rank", False)}


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
                         f"(differ: {', '.join(diff)}); {_changed_key(diff[0])} changed since it was saved?")


def check_shape(where: Path, what: str, name: str, saved: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(saved) != tuple(expected):
        raise ValueError(f"{where}: checkpoint tensor '{name}' of {what} has shape {tuple(saved)}, the model "
                         f"has {tuple(expected)}: {_changed_key(name)} changed since it was saved; restore "
                         "it, or start a new run")


def _changed_key(tensor: str) -> str:
    """The config key that most likely changed a trainable tensor's name or shape."""
    if "lora" in tensor or "magnitude" in tensor:
        return "lora_rank / lora_targets / use_dora"
    return "model (its config.json)"


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
    weights = {name: trainable_state(model) for name, model in state.models.items()}
    optimizers = {name: optimizer.state_dict() for name, optimizer in state.optimizers.items()}
    with atomic_dir(final, need_bytes=tensor_bytes(weights) + tensor_bytes(optimizers)) as tmp:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / weights_file(name)))
        for name, optimizer_state in optimizers.items():
            torch.save(optimizer_state, tmp / f"{name}.pt")
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
        for n, w in weights.items():
            check_shape(step_dir, f"model '{name}'", n, w.shape, params[n].shape)
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
