"""User errors and their one-line form, shared by `tune` and `python recipe.py`.

No heavy imports here: the `tune` entry point uses this at start-up.
"""

from __future__ import annotations

import os
import sys


# Bad input, or a problem of the machine (a missing file, a full disk): one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
INTERRUPTED = 130  # exit status after Ctrl-C, the shell's 128 + SIGINT
# Set by `tune run`'s launcher for torchrun's workers: each leaves its error line there and the
# launcher prints the distinct ones, so N ranks hitting one error print it once.
ERROR_DIR_ENV = "TUNEWRIGHT_ERROR_DIR"
DEBUG_HINT = " (TUNEWRIGHT_DEBUG=1 shows the traceback)"


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one actionable line."""


def report_user_error(line: str) -> None:
    """Print a user error's line, or leave it for `tune run`'s launcher (a torchrun worker)."""
    folder, rank = os.environ.get(ERROR_DIR_ENV), os.environ.get("RANK")
    if folder and rank is not None and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank_{rank}.txt"), "w", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    print(line, file=sys.stderr)


def user_error_line(e: BaseException) -> str:
    """`error: <first line>`; errors not raised by config checking (they may come from deep in a
    recipe) say how to see the traceback."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    if not isinstance(e, ConfigError):
        msg += DEBUG_HINT
    return f"error: {msg}"
