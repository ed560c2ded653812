"""Sharded step checkpoints with torch.distributed.checkpoint (DCP) for distributed recipes.

Every rank writes its own shards of the trainable weights and optimizer state (FSDP2 DTensors
or plain tensors) and nobody gathers, so saving a 70B model costs no more memory than training
it; loading reshards, so a run resumes on any number of ranks. Same place and marker file as
`training/checkpointing.py`, so `resolve_resume` (and `resume_from_checkpoint: auto`) finds both:

    <output_dir>/checkpoints/step_<N>/
        dcp/               per model of the `TrainState`: its trainable parameters
                           ("<model>.model.*") and its optimizers' state ("<model>.optim.*")
        train_state.pt     the run's counters, every other entry (scheduler, data position),
                           world size, seed (rank 0)
        rng/rank_<r>.pt    torch + python RNG of rank r, and its `per_rank` entries
        ...                whatever `export(dir)` writes (e.g. the PEFT adapter of that step)

Atomic: all ranks write into `checkpoints/.step_<N>.tmp`, a name each derives from the step (no
message needed); rank 0 renames it once every rank is done, then prunes to `keep_last`. A run
killed mid-save leaves only the `.tmp` directory, which resume ignores and the next run removes
at its start (`training/run_dir.py`). Before writing, the checkpoint's size (rank 0's shards
times the world size) is checked against the free space; a full disk while writing is one
`DiskFullError` line on every rank, the temporary is removed and the previous checkpoints stay.

Async (`async_save=True`): the state is copied to CPU memory, then written by a background
thread while training goes on; its collectives run on a gloo group of their own (never on the
training group from another thread). Rank 0 renames the directory as soon as DCP finishes, which
implies every rank has written (DCP gathers every rank's write results before finishing). The
next `save` and `wait()` (called by `Run.steps` at the end) wait for it.

Another world size: DCP reshards model and optimizer; the sampler converts its position
(`data/sampler.py`); a rank that had no RNG file (the run grew) seeds torch and python from
sha256(seed, step, rank), `seed` being `torch.initial_seed()` of rank 0 when it saved (the
recipe's seed), so the same resume always draws the same numbers.

Timeouts: DCP's collectives exchange only small plans and metadata, but the last one waits for
the slowest rank's writes. The process group timeout (`init_process_group(timeout=...)`) must
cover one rank writing its shard of the state; for 70B-scale optimizer state on slow storage
use e.g. 30-60 minutes rather than NCCL's 10-minute default. The async group uses the default
group's timeout.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.atomic import (check_free_space, disk_full_error, follow_umask, is_disk_full,
                                       put_in_place, tensor_bytes)
from tunewright.training.checkpointing import SHARDED_DIR as DCP_DIR
from tunewright.training.checkpointing import (STATE_FILE, Export, check_names, check_shape, checkpoints_dir,
                                               load_object_states, object_states, prune, rank_object_states,
                                               rng_state, set_rng_state, step_dir_name)
from tunewright.training.state import TrainState

RNG_DIR = "rng"

# Without a process group (a one-process run) DCP warns on every save and load that it assumes
# one process, which is exactly what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) come from the pretrained files at every start; strict=False
    # because they are missing on load, `_check_keys` guards the trainable ones instead.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _inner(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """What DCP reads optimizer state from: `OptimizerInBackward` keeps one optimizer per
    parameter, and its own `state_dict` is no format DCP knows."""
    from tunewright.training.optim_in_backward import OptimizerInBackward

    return list(optimizer.optimizers) if isinstance(optimizer, OptimizerInBackward) else [optimizer]


def _grouped(state: TrainState) -> dict[str, tuple[nn.Module, list[torch.optim.Optimizer]]]:
    """Model name -> (model, the optimizers stepping it): DCP keys optimizer state by the
    parameter names of its model."""
    from torch.distributed.fsdp import FSDPModule

    # A forward without backward (an evaluation, a rollout) leaves the root gathered (it is not
    # resharded after forward): its parameters are then the gathered tensors, not the shards
    # the optimizers step and DCP saves. Put every model back to its shards first.
    for module in (m for model in state.models.values() for m in model.modules()):
        if isinstance(module, FSDPModule):
            module.reshard()
    owners = state.optimizer_owners()
    return {name: (model, [opt for o, opt in state.optimizers.items() if owners[o] == name])
            for name, model in state.models.items()}


def _tensor_state(state: TrainState) -> dict[str, Any]:
    """{model: {"model": trainable parameters, "optim": its optimizers' state}}, as DTensors
    where sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    out: dict[str, Any] = {}
    for name, (model, optimizers) in _grouped(state).items():
        buffers = {n for n, _ in model.named_buffers()}
        inner = [o for opt in optimizers for o in _inner(opt)]
        if inner:
            model_sd, optim_sd = get_state_dict(model, inner, options=_options())
        else:
            model_sd, optim_sd = get_model_state_dict(model, options=_options()), {}
        out[name] = {"model": {k: v for k, v in model_sd.items() if k not in buffers}, "optim": optim_sd}
    return out


def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of a rank the saving run did not have."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _local_bytes(tensors: Any) -> int:
    """Bytes this rank writes: its shards of every (DTensor) tensor."""
    if hasattr(tensors, "to_local"):
        return tensor_bytes(tensors.to_local())
    if isinstance(tensors, dict):
        return sum(_local_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(_local_bytes(v) for v in tensors)
    return tensor_bytes(tensors)


def _check_space(final: Path, tensors: Any) -> int:
    """About what all ranks write (FSDP shards are even: rank 0's times the world size) against
    the free space; rank 0 decides for every rank, so none writes while another gives up."""
    from tunewright.training.run_dir import on_rank0

    need = _local_bytes(tensors) * dist.world_size()
    on_rank0(lambda: check_free_space(final, need))
    return need


def _publish(tmp: Path, final: Path, output_dir: str | Path, keep_last: int | None) -> None:
    """Rank 0, once every rank has written: the temporary directory becomes the checkpoint."""
    follow_umask(tmp)
    put_in_place(tmp, final)  # the same step may be saved again (resumed from an earlier one)
    prune(output_dir, keep_last)


class ShardedCheckpointer:
    """The checkpointer of distributed runs (`save`/`load`/`wait` as `LocalCheckpointer`).

    `export(dir)` is called on every rank with the same directory, since exporting sharded
    weights needs a gather that all ranks join; it must write files from rank 0 only.
    """

    def __init__(self, *, async_save: bool = False) -> None:
        self.async_save = async_save
        self._pending: concurrent.futures.Future | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._group: Any = None

    def save(self, output_dir: str | Path, step: int, state: TrainState, *, run_state: dict[str, Any],
             export: Export | None = None, keep_last: int | None = None) -> Path | None:
        """Write step `step`; returns its directory on rank 0 (with async, once it completes)."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time, and never two writers in one directory
        final = checkpoints_dir(output_dir) / step_dir_name(step)
        tmp = final.parent / f".{final.name}.tmp"
        tensors = _tensor_state(state)
        need = _check_space(final, tensors)
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            (tmp / RNG_DIR).mkdir(parents=True)
        dist.barrier()
        try:
            # This rank's RNG and its own entries (`per_rank`: e.g. each rank's sampling generator).
            torch.save({**rng_state(), "rank_objects": rank_object_states(state)}, _rng_file(tmp, dist.rank()))
            if dist.is_main():
                torch.save({"run": run_state, "objects": object_states(state), "world_size": dist.world_size(),
                            "seed": torch.initial_seed()}, tmp / STATE_FILE)
            if export is not None:
                export(tmp)
            if not self.async_save:
                dcp.save(tensors, checkpoint_id=tmp / DCP_DIR)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._discard(tmp)
            if is_disk_full(e):
                raise disk_full_error(final, need) from None
            raise
        if not self.async_save:
            dist.barrier()  # every rank's shards are on disk
            if dist.is_main():
                _publish(tmp, final, output_dir, keep_last)
            dist.barrier()
            return final if dist.is_main() else None
        saving = dcp.async_save(tensors, checkpoint_id=tmp / DCP_DIR, process_group=self._async_group())
        saving = getattr(saving, "upload_completion", saving)  # newer torch: AsyncSaveResponse
        publish = dist.is_main()

        def finish() -> None:
            try:
                saving.result()  # raises here (then in `wait`) if writing failed: nothing is renamed
            except BaseException as e:
                self._discard(tmp)
                if is_disk_full(e):
                    raise disk_full_error(final, need) from None
                raise
            if publish:
                _publish(tmp, final, output_dir, keep_last)

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcp-publish")
        self._pending = self._executor.submit(finish)
        return final if dist.is_main() else None

    @staticmethod
    def _discard(tmp: Path) -> None:
        """A failed write (every rank raises it: DCP gathers the ranks' results): rank 0 removes
        the temporary, so the disk space comes back and the previous checkpoints stay alone."""
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Block until an async save is written and renamed (a no-op otherwise)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.result()
        dist.barrier()  # rank 0 has renamed: every rank sees the checkpoint after this

    def _async_group(self) -> Any:
        if self._group is None and dist.is_distributed():
            import torch.distributed

            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def load(self, step_dir: Path, state: TrainState) -> dict[str, Any]:
        """Restore every entry (resharded to this run) and this rank's RNG; return the run's
        saved counters."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        step_dir = Path(step_dir)
        if not (step_dir / DCP_DIR / ".metadata").is_file():
            raise ValueError(f"{step_dir} is not a sharded checkpoint (no {DCP_DIR}/.metadata); a "
                             f"one-process run wrote it, resume it with distributed=false")
        self.wait()
        tensors = _tensor_state(state)
        _check_keys(step_dir, tensors)
        dcp.load(tensors, checkpoint_id=step_dir / DCP_DIR)
        for name, (model, optimizers) in _grouped(state).items():
            inner = [o for opt in optimizers for o in _inner(opt)]
            if inner:
                set_state_dict(model, inner, model_state_dict=tensors[name]["model"],
                               optim_state_dict=tensors[name]["optim"], options=_options())
            else:
                set_model_state_dict(model, tensors[name]["model"], options=_options())
            for opt in optimizers:  # loading made new group dicts: point the outer ones at them
                if _inner(opt) != [opt]:
                    opt.param_groups[:] = [g for o in _inner(opt) for g in o.param_groups]
        saved = torch.load(step_dir / STATE_FILE, weights_only=True)
        load_object_states(state, saved["objects"], step_dir)
        rng = _rng_file(step_dir, dist.rank())
        if rng.is_file():
            mine = torch.load(rng, weights_only=True)
            set_rng_state(mine)
            for name, value in mine.get("rank_objects", {}).items():
                state.objects[name].load_state_dict(value)
        else:  # this rank did not exist in the saving run (it had `world_size` ranks)
            if dist.rank() < saved["world_size"]:
                raise ValueError(f"{rng} is missing: the checkpoint is incomplete")
            new_seed = derived_seed(saved["seed"], saved["run"]["step"], dist.rank())
            torch.manual_seed(new_seed)
            random.seed(new_seed)
            for obj in state.objects.values():
                if getattr(obj, "per_rank", False):
                    obj.reseed(new_seed)  # not rank 0's stream, loaded above
        return saved["run"]


def _check_keys(step_dir: Path, tensors: dict[str, Any]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir / DCP_DIR)).read_metadata()
    for name, entry in tensors.items():
        prefix = f"{name}.model."
        saved = {k.removeprefix(prefix): v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}
        check_names(step_dir, f"model '{name}'", set(saved), set(entry["model"]))
        for key, value in entry["model"].items():
            size = getattr(saved[key], "size", None)  # tensors only (DCP also stores bytes)
            if size is not None:
                check_shape(step_dir, f"model '{name}'", key, tuple(size), tuple(value.shape))
