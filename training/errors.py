"""User errors and their one-line form, shared by `tune` and `python recipe.py`.

No heavy imports here: the `tune` entry point uses this at start-up.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one actionable line."""


def user_error_line(e: BaseException) -> str:
    """`error: <first line>`; errors not raised by config checking (they may come from deep in a
    recipe) say how to see the traceback."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    if not isinstance(e, ConfigError):
        msg += " (TUNEWRIGHT_DEBUG=1 shows the traceback)"
    return f"error: {msg}"
