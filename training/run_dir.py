"""One run per output directory, and runs that never mix (`Run` calls `prepare_output_dir` on
rank 0 before it writes anything):

1. a lock: `<output_dir>/.tunewright.lock`, an advisory `flock` the kernel releases however
   the process ends (a killed run leaves no lock behind, only its pid in the file, which the
   next run reports as taken over); where the filesystem has no `flock`, the pid and host in
   the file decide, and a dead process's lock on this host is taken over;
2. the temporaries a killed run left (`.<name>.tmp-*`, DCP's `.step_<N>.tmp`) are removed,
   only ours, by name;
3. an earlier run's files (checkpoints, metrics.jsonl, exports) are never mixed with a new
   run's: without resume the run refuses, naming how to resume or start over; with
   `overwrite_output_dir: true` it deletes what the earlier run wrote (checkpoints,
   metrics.jsonl, the export directories if they hold only an export) and starts clean;
4. the export directories (`final/`, `merged/`, `adapter/`) must hold nothing but a previous
   export of their kind, checked now rather than after hours of training.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from tunewright.training.atomic import OutputExistsError, OutputKind, check_output_dir, remove_temporaries
from tunewright.training.checkpointing import checkpoints_dir, step_dirs
from tunewright.training.errors import ConfigError

LOCK_FILE = ".tunewright.lock"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
_DCP_TEMPORARY = re.compile(r"^\.step_\d+\.tmp$")  # ShardedCheckpointer's fixed temporary name
_DAMAGED = re.compile(r"^step_\d+\.damaged$")  # set aside by resume (training/checkpointing.py)


def export_kinds() -> dict[str, OutputKind]:
    """The directories a training recipe exports into, by kind."""
    from tunewright.models.peft_adapter import PEFT_ADAPTER
    from tunewright.models.pretrained import HF_MODEL

    return {"final": HF_MODEL, "merged": HF_MODEL, "adapter": PEFT_ADAPTER}


# ---------------------------------------------------------------- the lock
_HELD: dict[Path, "RunLock"] = {}  # locks this process holds, by directory


class RunLock:
    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise `ValueError` naming the holder; returns the earlier holder whose
        lock was stale (it ended without releasing it), if any."""
        earlier = _HELD.pop(self.directory, None)
        if earlier is not None:  # a Run of this process abandoned here (e.g. after an error)
            earlier.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            holder = self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD[self.directory] = self
        return holder

    def _lock(self, fd: int) -> str | None:
        import fcntl

        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return holder  # whoever wrote it is gone: the kernel dropped their lock
        except BlockingIOError:
            raise ValueError(self._busy(holder)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # No flock on this filesystem: the pid in the file decides (on this host).
        if holder is not None:
            pid, _, host = holder.partition(" ")
            if host != socket.gethostname() or _alive(int(pid)):
                raise ValueError(self._busy(holder, no_flock=True))
        return holder

    def _busy(self, holder: str | None, no_flock: bool = False) -> str:
        pid, _, host = (holder or "? ?").partition(" ")
        stale = f"; if it is not running, delete {self.path}" if no_flock else ""
        return (f"output_dir {self.directory}: another run is writing there (process {pid} on {host}); "
                f"wait for it to end or choose another output_dir{stale}")

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # a clean exit leaves no holder named
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if _HELD.get(self.directory) is self:
            del _HELD[self.directory]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- earlier runs
def earlier_run(directory: Path, *, run_was_here: bool) -> list[str]:
    """What an earlier run left in `directory` that a new run would mix with; `run_was_here`:
    a run took the directory's lock before (the lock file existed)."""
    found = []
    steps = step_dirs(directory)
    if steps:
        found.append(f"checkpoints up to step {steps[-1][0]}")
    if (directory / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    found += [name for name, kind in export_kinds().items()
              if (directory / name).is_dir() and kind.is_output(directory / name)]
    # config.yaml alone: a run that failed before its first step (it took the lock) left it,
    # or it is the user's own file, which a run must not replace.
    if not found and (directory / CONFIG_FILE).is_file() and not run_was_here:
        found.append(f"{CONFIG_FILE}, not written by a run")
    return found


def start_clean(directory: Path) -> None:
    """Delete what an earlier run wrote: its checkpoints, metrics.jsonl and the exports (each
    only if it holds an export of its kind and nothing else; anything else stays)."""
    for _, step_dir in step_dirs(directory):
        shutil.rmtree(step_dir)
    root = checkpoints_dir(directory)
    if root.is_dir():
        for entry in root.iterdir():
            if _DAMAGED.match(entry.name):
                shutil.rmtree(entry)
        if not any(root.iterdir()):
            root.rmdir()
    (directory / METRICS_FILE).unlink(missing_ok=True)
    for name, kind in export_kinds().items():
        export = directory / name
        if export.is_dir() and kind.is_output(export):
            shutil.rmtree(export)


def _check_exports(directory: Path) -> None:
    for name, kind in export_kinds().items():
        try:
            check_output_dir(directory / name, kind)
        except OutputExistsError as e:
            raise ConfigError(f"{e.path}: this run exports {kind.name} there, but it holds other files "
                             f"({', '.join(e.holds[:3])}); move them, or choose another output_dir") from None


def prepare_output_dir(directory: Path, *, resuming: bool, overwrite: bool) -> tuple[RunLock, list[str]]:
    """Rank 0, before the run writes anything: lock, clear temporaries, refuse or clean an
    earlier run. Returns the lock and the lines to print."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"output_dir {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    run_was_here = (directory / LOCK_FILE).is_file()
    lock = RunLock(directory)
    stale = lock.acquire()
    notes = []
    try:
        if stale and stale.split(" ", 1)[0] != str(os.getpid()):
            notes.append(f"output_dir: the run that held it (process {stale}) ended without releasing it")
        cleared = remove_temporaries(directory) + remove_temporaries(checkpoints_dir(directory))
        root = checkpoints_dir(directory)
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            if _DCP_TEMPORARY.match(entry.name):
                shutil.rmtree(entry)
                cleared.append(entry.name)
        if cleared:
            notes.append(f"removed {len(cleared)} unfinished write(s) left by an interrupted run: "
                         + ", ".join(cleared[:4]))
        found = earlier_run(directory, run_was_here=run_was_here)
        if found and overwrite:
            start_clean(directory)
            notes.append(f"overwrite_output_dir: deleted the earlier run's {', '.join(found)}")
        elif found and not resuming:
            raise ConfigError(f"output_dir {directory} holds an earlier run ({', '.join(found)}); continue it "
                             "with resume_from_checkpoint=auto, start over with overwrite_output_dir=true "
                             "(deletes its checkpoints, metrics and exports), or choose another output_dir")
        _check_exports(directory)
    except BaseException:
        lock.release()
        raise
    return lock, notes


def on_rank0(fn: Any) -> Any:
    """Run `fn()` on rank 0 and give every rank its outcome: its (picklable) result, or its
    error, raised on every rank as a `ValueError` (no rank waits at a collective for one that
    failed)."""
    from tunewright.training import distributed as dist

    result, error = None, None
    if dist.is_main():
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = e
    if dist.is_distributed():
        import torch.distributed

        box = [result, None if error is None else str(error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
        if box[1] is not None and error is None:
            error = ValueError(box[1])
    if error is not None:
        raise error
    return result
