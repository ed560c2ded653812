"""torchrun launches for the multi-process tests: one thread per process, a free port, a
timeout, and the workers' output in the failure message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(nproc: int, script: str | Path, args: Sequence[str],
                 launcher: Sequence[str] = ()) -> list[str]:
    launcher = list(launcher) or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc),
            str(script), *map(str, args)]


def torchrun(nproc: int, script: str | Path, args: Sequence[str], *, timeout: float = 300,
             expect_ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, script, args), env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
    return proc


def start(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Launch in the background, output to `log` (a pipe nobody reads could fill and block)."""
    with open(log, "w") as sink:  # its own session: a test that gives up kills all its workers
        proc = subprocess.Popen(list(map(str, cmd)), env={**ENV, **(env or {})}, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = Path(log)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out after {timeout} s:\n{tail(proc.log.read_text())}")
    return proc.returncode, proc.log.read_text()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The content of `path` once it is written (non-empty), while `proc` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (text := path.read_text().strip()):
            return text
        if proc.poll() is not None:
            log = tail(proc.log.read_text())
            raise AssertionError(f"exited ({proc.returncode}) before writing {path}:\n{log}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{path} not written within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> dict[int, float]:
    """Step -> loss from rank 0's metrics.jsonl (a resumed run rewrites the steps after its
    checkpoint, so each step is there once)."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def metric_lines(out: Path) -> list[str]:
    return (Path(out) / "metrics.jsonl").read_text().splitlines()


def assert_resumed_at(out: Path, before: list[str], step: int) -> None:
    """The launch after `before` was taken continued from the step-`step` checkpoint: it kept
    the lines (with their times) of steps up to `step` and wrote the later ones anew."""
    after = metric_lines(out)
    assert after[:step] == before[:step] and after[step] != before[step]


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]
