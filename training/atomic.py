"""How everything we write reaches the disk: under a temporary name, then renamed, so a crash
never leaves a half-written checkpoint or output where a reader would take it as whole.

The rules every writer follows through this module:
- `atomic_dir` / `atomic_write_text`: temporary sibling (`.<name>.tmp-<8 hex>`), then rename.
  A crash leaves only such temporaries; `remove_temporaries` clears ours at the next start.
- Written files follow the umask, as any other program's (safetensors creates 0600 files, which
  a shared cluster cannot read).
- Where the size is known in advance it is checked against the free space before anything is
  written; a full disk while writing is one line (`DiskFullError`) with the path, the bytes
  needed and free, and the temporary is removed (what was there before stays).
- `output_dir`: a directory a user names (an exported model, an adapter) is written only if it
  is absent, empty or a previous output of the same kind; anything else needs `overwrite=True`
  (`--force` on the command line), and even then only the files we write are replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# `.<name>.tmp-<8 hex>` and `.<name>.old-<8 hex>`: the only names `atomic_dir` and
# `atomic_write_text` leave behind when killed.
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")


def _sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- permissions
def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under umask 022)."""
    try:  # Linux reports it without changing it (os.umask would race with writer threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(root: Path) -> None:
    """Give every file we wrote under `root` (or `root` itself) the umask's mode: safetensors
    creates its files 0600 whatever the umask."""
    mode = file_mode()
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for path in paths:
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


# ---------------------------------------------------------------- free space
class DiskFullError(OSError, ValueError):
    """No space left where we write: the one line says where, how much was needed and free.
    (A ValueError too, so every entry point shows it as a user error, not a traceback.)"""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _full_message(where: Path, need: int | None) -> str:
    needs = f"needs about {human_bytes(need)}, " if need else ""
    return (f"{where}: no space left on device ({needs}{human_bytes(free_bytes(where))} free); "
            "nothing was replaced: free some space and run again")


def check_free_space(where: str | Path, need: int) -> None:
    """Refuse before writing `need` bytes at `where` if the filesystem has less free."""
    if need > free_bytes(Path(where).parent):
        raise DiskFullError(errno.ENOSPC, _full_message(Path(where), need))


def is_disk_full(e: BaseException) -> bool:
    """Whether a write failed for lack of space: an OSError with ENOSPC/EDQUOT, or the forms
    libraries turn it into (safetensors' "No space left on device", torch.save's zip writer's
    "unexpected pos", a short write that never says why)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28",
                                   "unexpected pos", "file write failed")):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(where: str | Path, need: int | None) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, _full_message(Path(where), need))


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, about."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def _temporary(final: Path, need_bytes: int | None) -> Iterator[Path]:
    """An empty temporary sibling of `final`, removed if the block fails (a full disk becomes
    `DiskFullError`); the caller puts it in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if need_bytes:
        check_free_space(final, need_bytes)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        follow_umask(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(final, need_bytes) from None
        raise


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces `final` whole (for
    directories we own entirely, such as a step checkpoint). `need_bytes`: the size about to be
    written, checked against the free space first."""
    final = Path(final)
    with _temporary(final, need_bytes) as tmp:
        yield tmp
    put_in_place(tmp, final)


def put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final`, replacing a `final` there (moved aside as
    `.<name>.old-*` first: a crash between the renames leaves it for `remove_temporaries` to
    put back)."""
    if final.exists():
        old = _sibling(final, "old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_text(text)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, len(text.encode())) from None
        raise
    os.replace(tmp, path)


def remove_temporaries(directory: Path) -> list[str]:
    """Clear what `atomic_dir`/`atomic_write_text` leave in `directory` when killed (only names
    of our pattern): `.X.tmp-*` is removed; `.X.old-*` is the previous X, put back if X is
    missing (killed between the two renames), else removed. Returns the names cleared. Call it
    only where no writer of ours is running (a run holds its directory's lock)."""
    cleared = []
    if not directory.is_dir():
        return cleared
    for entry in sorted(directory.iterdir()):
        m = TEMPORARY.match(entry.name)
        if m is None:
            continue
        target = directory / m.group("name")
        if m.group("tag") == "old" and not target.exists():
            os.rename(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        cleared.append(entry.name)
    return cleared


# ---------------------------------------------------------------- user-named output directories
@dataclass(frozen=True)
class OutputKind:
    """What a written directory is: `is_output(dir)` recognises a previous one of this kind;
    `stale(name)` names the files of a previous one that a new one supersedes even if it does
    not write them itself (e.g. weight shards of a differently sharded model)."""

    name: str  # "a Hugging Face model"
    is_output: Callable[[Path], bool]
    stale: Callable[[str], bool] = lambda name: False


class OutputExistsError(ValueError):
    """A non-empty directory that is not a previous output of the kind being written. The
    Python API says `overwrite=True`; a command says its own flag (`with_flag('--force')`)."""

    def __init__(self, path: Path, kind: OutputKind, holds: list[str], flag: str = "overwrite=True") -> None:
        self.path, self.kind, self.holds, self.flag = path, kind, holds, flag
        shown = ", ".join(holds[:3]) + (f" and {len(holds) - 3} more" if len(holds) > 3 else "")
        super().__init__(f"{path}: not empty and not {kind.name} written before (it holds {shown}); "
                         f"choose another directory, or pass {flag} to write into it (only the "
                         "files written replace theirs; nothing else is deleted)")

    def with_flag(self, flag: str) -> "OutputExistsError":
        return OutputExistsError(self.path, self.kind, self.holds, flag)


def check_output_dir(path: str | Path, kind: OutputKind, *, overwrite: bool = False) -> None:
    """Refuse (before any work) a `path` that exists and is not a directory, or is a non-empty
    directory that is not a previous output of `kind`, unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    if not path.is_dir() or overwrite or kind.is_output(path):
        return
    holds = sorted(p.name for p in path.iterdir())
    if holds:
        raise OutputExistsError(path, kind, holds)


@contextlib.contextmanager
def output_dir(final: str | Path, kind: OutputKind, *, overwrite: bool = False,
               need_bytes: int | None = None) -> Iterator[Path]:
    """Write a user-named directory: checked by `check_output_dir`, written into a temporary
    sibling, then renamed into place if `final` is absent or empty; otherwise each written file
    replaces its namesake (a previous output's stale files go too), every other file stays."""
    final = Path(final)
    check_output_dir(final, kind, overwrite=overwrite)
    with _temporary(final, need_bytes) as tmp:
        yield tmp
    if final.is_dir() and any(final.iterdir()):
        _merge_into(tmp, final, stale=kind.stale if kind.is_output(final) else None)
        return
    if final.is_dir():
        final.rmdir()  # empty: the whole output takes its place
    os.rename(tmp, final)


def _merge_into(tmp: Path, final: Path, *, stale: Callable[[str], bool] | None) -> None:
    """Move the files of `tmp` into `final`, each replacing its namesake atomically; then the
    stale files of a previous output go. config.json moves last, so a reader never pairs a new
    config with old weights."""
    written = sorted(p.name for p in tmp.iterdir())
    for name in written:
        if name != "config.json":
            os.replace(tmp / name, final / name)
    if stale is not None:
        for old in final.iterdir():
            if old.is_file() and old.name not in written and stale(old.name):
                old.unlink()
    if "config.json" in written:
        os.replace(tmp / "config.json", final / "config.json")
    shutil.rmtree(tmp, ignore_errors=True)
