"""Sharded step checkpoints with torch.distributed.checkpoint (DCP) for distributed recipes.

Every rank writes its own shards of the trainable weights and optimizer state (FSDP2 DTensors
or plain tensors) and nobody gathers, so saving a 70B model costs no more memory than training
it; loading reshards, so a run resumes on any number of ranks. Same place and marker file as
`training/checkpointing.py`, so `resolve_resume` (and `resume_from_checkpoint: auto`) finds both:

    <output_dir>/checkpoints/step_<N>/
        dcp/               trainable parameters ("model.*") + optimizer ("optimizer.*"), DCP files
        trainer_state.pt   step, epoch, sampler position, lr scheduler, world size, seed (rank 0)
        rng/rank_<r>.pt    torch + python RNG of rank r
        ...                whatever `export(dir)` writes (e.g. the PEFT adapter of that step)

Atomic: all ranks write into `checkpoints/.step_<N>.tmp`, a name each derives from the step (no
message needed); rank 0 renames it once every rank is done, then prunes to `keep_last`. A run
killed mid-save leaves only the `.tmp` directory, which resume ignores and the next save of that
step replaces.

Async (`async_save=True`): the state is copied to CPU memory, then written by a background
thread while training goes on; its collectives run on a gloo group of their own (never on the
training group from another thread). Rank 0 renames the directory as soon as DCP finishes, which
implies every rank has written (DCP gathers every rank's write results before finishing). The
next `save` and `wait()` (called by `Trainer.fit` at the end) wait for it.

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
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.checkpointing import SHARDED_DIR as DCP_DIR
from tunewright.training.checkpointing import STATE_FILE, checkpoints_dir, rng_state, set_rng_state, step_dirs

RNG_DIR = "rng"

# Without a process group (a one-process run) DCP warns on every save and load that it assumes
# one process, which is exactly what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) come from the pretrained files at every start; strict=False
    # because they are missing on load, `_check_keys` guards the trainable ones instead.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _optimizers(optimizer: torch.optim.Optimizer) -> Any:
    """What DCP reads optimizer state from: `OptimizerInBackward` keeps one optimizer per
    parameter, and its own `state_dict` is no format DCP knows."""
    from tunewright.training.optim_in_backward import OptimizerInBackward

    return optimizer.optimizers if isinstance(optimizer, OptimizerInBackward) else optimizer


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable parameters, "optimizer": its state}, as DTensors where sharded."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer), options=_options())
    buffers = {name for name, _ in model.named_buffers()}
    return {"model": {k: v for k, v in model_sd.items() if k not in buffers}, "optimizer": optim_sd}


def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of a rank the saving run did not have."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _publish(tmp: Path, final: Path, output_dir: str | Path, keep_last: int | None) -> None:
    """Rank 0, once every rank has written: the temporary directory becomes the checkpoint."""
    if final.exists():  # the same step saved again (resumed from an earlier explicit path)
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    if keep_last:
        for _, stale in step_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)


class ShardedCheckpointer:
    """`Trainer`'s checkpointer for distributed recipes (`save`/`load` as `LocalCheckpointer`).

    `export(dir)` is called on every rank with the same directory, since exporting sharded
    weights needs a gather that all ranks join; it must write files from rank 0 only.
    """

    def __init__(self, *, async_save: bool = False) -> None:
        self.async_save = async_save
        self._pending: concurrent.futures.Future | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._group: Any = None

    def save(
        self,
        output_dir: str,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        export: Callable[[Path], None] | None = None,
        keep_last: int | None = None,
    ) -> Path | None:
        """Write step `step`; returns its directory on rank 0 (with async, once it completes)."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time, and never two writers in one directory
        final = checkpoints_dir(output_dir) / f"step_{step:06d}"
        tmp = final.parent / f".{final.name}.tmp"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            (tmp / RNG_DIR).mkdir(parents=True)
        dist.barrier()
        torch.save(rng_state(), _rng_file(tmp, dist.rank()))
        if dist.is_main():
            torch.save({**trainer_state, "world_size": dist.world_size(), "seed": torch.initial_seed()},
                       tmp / STATE_FILE)
        if export is not None:
            export(tmp)
        state = _trainable_state(model, optimizer)
        if not self.async_save:
            dcp.save(state, checkpoint_id=tmp / DCP_DIR)
            dist.barrier()  # every rank's shards are on disk
            if dist.is_main():
                _publish(tmp, final, output_dir, keep_last)
            dist.barrier()
            return final if dist.is_main() else None
        saving = dcp.async_save(state, checkpoint_id=tmp / DCP_DIR, process_group=self._async_group())
        saving = getattr(saving, "upload_completion", saving)  # newer torch: AsyncSaveResponse
        publish = dist.is_main()

        def finish() -> None:
            saving.result()  # raises here (then in `wait`) if writing failed: nothing is renamed
            if publish:
                _publish(tmp, final, output_dir, keep_last)

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcp-publish")
        self._pending = self._executor.submit(finish)
        return final if dist.is_main() else None

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

    def load(self, step_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore weights and optimizer in place (resharded to this run); set this rank's RNG;
        return the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        step_dir = Path(step_dir)
        if not (step_dir / DCP_DIR / ".metadata").is_file():
            raise ValueError(f"{step_dir} is not a sharded checkpoint (no {DCP_DIR}/.metadata); a "
                             f"single-device recipe wrote it, resume it with one")
        self.wait()
        state = _trainable_state(model, optimizer)
        _check_keys(step_dir, set(state["model"]))
        dcp.load(state, checkpoint_id=step_dir / DCP_DIR)
        optimizers = _optimizers(optimizer)
        set_state_dict(model, optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=_options())
        if optimizers is not optimizer:  # loading made new group dicts: the scheduler's view
            optimizer.param_groups[:] = [g for opt in optimizers for g in opt.param_groups]
        trainer_state = torch.load(step_dir / STATE_FILE, weights_only=True)
        saved_world, seed = trainer_state.pop("world_size"), trainer_state.pop("seed")
        rng = _rng_file(step_dir, dist.rank())
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:  # this rank did not exist in the saving run (it had `saved_world` ranks)
            if dist.rank() < saved_world:
                raise ValueError(f"{rng} is missing: the checkpoint is incomplete")
            new_seed = derived_seed(seed, trainer_state["step"], dist.rank())
            torch.manual_seed(new_seed)
            random.seed(new_seed)
        return trainer_state


def _check_keys(step_dir: Path, expected: set[str]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir / DCP_DIR)).read_metadata()
    saved = {k.removeprefix("model.") for k in metadata.state_dict_metadata if k.startswith("model.")}
    if saved != expected:
        diff = sorted(saved ^ expected)[:3]
        raise ValueError(f"{step_dir}: checkpoint does not match this model's trainable "
                         f"parameters (differ: {', '.join(diff)}); was the config changed?")
