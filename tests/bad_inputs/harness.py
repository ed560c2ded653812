"""The catalogue of bad inputs: every case runs a real entry point (the `tune` command in this
process, or a subprocess where exit codes, signals or torchrun matter) and asserts what a user
sees: a non-zero exit, exactly one line on stderr that names the culprit, no traceback, and
that nothing was half-written or deleted.

Each `tests/bad_inputs/test_bad_<area>.py` holds a table of `Case`s for one area and parametrizes
over it; `catalogue_size()` counts them all for the README's reliability figures.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
TINY = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "max_steps=2"]


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Case:
    """One bad input: `argv` for `tune` (a callable gets the case's tmp dir and returns argv,
    after writing whatever files the case needs), the fragments the one error line must hold,
    and the files that must not exist afterwards (half-written outputs) or must still exist
    (what the user had)."""

    id: str
    argv: Sequence[str] | Callable[[Path], Sequence[str]]
    fragments: Sequence[str]
    code: int = 2
    absent: Sequence[str] = ()  # paths relative to the tmp dir
    kept: Sequence[str] = ()  # paths relative to the tmp dir, created by the setup callable
    subprocess: bool = False  # run `tune` as a real process (signals, torchrun, exit codes)
    env: dict[str, str] = field(default_factory=dict)


def run_tune(argv: Sequence[str], *, cwd: Path, subprocess_: bool = False,
             env: dict[str, str] | None = None) -> Result:
    """`tune ARGV`: in this process (fast) or as the console script."""
    full_env = {k: v for k, v in os.environ.items() if k != "TUNEWRIGHT_DEBUG"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    if subprocess_:
        tune = Path(sys.executable).parent / "tune"
        done = subprocess.run([str(tune), *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                              env=full_env, timeout=600)
        return Result(done.returncode, done.stdout, done.stderr)
    from tunewright.tune_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    saved_cwd = Path.cwd()
    os.environ.clear()
    os.environ.update(full_env)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_error_line(result: Result, fragments: Sequence[str], code: int = 2) -> str:
    assert result.code == code, (result.code, result.err[-3000:])
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.err[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in result.err, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def check(case: Case, tmp_path: Path) -> str:
    argv = case.argv(tmp_path) if callable(case.argv) else case.argv
    before = {p: p.stat().st_mtime_ns for rel in case.kept for p in [tmp_path / rel]}
    result = run_tune(argv, cwd=tmp_path, subprocess_=case.subprocess, env=case.env)
    line = assert_one_error_line(result, [f.format(tmp=tmp_path) for f in case.fragments], case.code)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), f"{rel} was written"
    for path, mtime in before.items():
        assert path.exists() and path.stat().st_mtime_ns == mtime, f"{path} was changed or deleted"
    return line


def catalogue_size() -> int:
    """How many cases the catalogue holds (every `CASES` table in this folder)."""
    import importlib.util

    total = 0
    for path in sorted(Path(__file__).parent.glob("test_bad_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        total += len(getattr(module, "CASES", ()))
    return total
