"""torchrun as `tune run` starts it: `python -m tunewright.tune_cli.launch [TORCHRUN ARGS]`.

The same launcher (`torch.distributed.run`), with two differences a user sees:

- Ctrl-C (SIGINT) or SIGTERM stops it quietly: the workers get the same signal (and exit
  without a traceback, `training.entry`), torchrun's shutdown report is dropped, and the exit
  status is 128 + the signal, so `tune run` prints its one line and nothing else;
- a worker that failed first with a user error (exit 2) ends the launch with status 2 and its
  one `error:` line, printed here once however many ranks hit the same error (the workers
  leave their lines in `TUNEWRIGHT_ERROR_DIR`, `training.entry`), without torchrun's report.
Any other failure is reported by torchrun as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from tunewright.training.errors import DEBUG_HINT, ERROR_DIR_ENV

QUIET_SIGNALS = (signal.SIGINT, signal.SIGTERM)
USER_ERROR = 2  # the exit status of a recipe's one-line user error (`training.entry`)


class _NoUserErrorReport(logging.Filter):
    """Drops torchrun's "failed (exitcode: 2) local_rank: ..." log line: the worker said why."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("failed (exitcode") and args[:1] == (USER_ERROR,))


def main(argv: Sequence[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig

    def stop(signum: int, frame: object) -> None:
        for sig in QUIET_SIGNALS:  # once: a second Ctrl-C must not cut the workers' shutdown short
            signal.signal(sig, signal.SIG_IGN)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())  # torchrun's shutdown report
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoUserErrorReport())
    args = list(argv)
    # torchrun's own handlers would replace ours for these signals (older torch always does).
    previous = {}
    if any(f.name == "signals_to_handle" for f in dataclasses.fields(LaunchConfig)):
        previous = {sig: signal.getsignal(sig) for sig in QUIET_SIGNALS}
        for sig in QUIET_SIGNALS:
            signal.signal(sig, stop)
        args = ["--signals_to_handle", "SIGHUP,SIGQUIT", *args]
    try:
        return _launch(torchrun, args, ChildFailedError, SignalException)
    finally:  # called in-process (the Python API, tests): leave the caller's handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch(torchrun: Any, args: list[str], ChildFailedError: type, SignalException: type) -> int:
    with tempfile.TemporaryDirectory(prefix="tunewright-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors  # the workers inherit it
        try:
            torchrun.main(args)
        except SignalException as e:
            return 128 + int(e.sigval)
        except ChildFailedError as e:
            lines = _worker_lines(Path(errors))
            if not (e.failures and e.get_first_failure()[1].exitcode == USER_ERROR and lines):
                raise
            for line in lines:  # the other ranks were stopped because of it, or said the same
                print(line, file=sys.stderr)
            return USER_ERROR
    return 0


def _worker_lines(folder: Path) -> list[str]:
    """The distinct error lines the workers left, in rank order (the same error may be a config
    error on the rank that found it and a plain one, with the debug hint, on the others)."""
    files = sorted(folder.glob("rank_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    lines = [p.read_text(encoding="utf-8").strip() for p in files]
    distinct: dict[str, str] = {}
    for line in lines:
        distinct.setdefault(line.removesuffix(DEBUG_HINT), line)
    return list(distinct.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
