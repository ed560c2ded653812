"""A tqdm progress bar over optimizer steps (ETA) with the last logged loss, tokens/s and MFU
(training/mfu.py); a silent stand-in on other ranks."""

from __future__ import annotations

import sys
from typing import Any


class _Bar:
    def __init__(self, total: int, initial: int, enabled: bool, show: bool) -> None:
        self.enabled = enabled  # print metric lines (rank 0)
        self._bar: Any = None
        if enabled and show:
            from tqdm import tqdm

            # ETA comes from tqdm's rate over optimizer steps; tokens/s from the step's timer.
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=None)  # None: off when not a terminal

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def show(self, **postfix: str) -> None:
        """Values shown beside the bar until the next call (e.g. loss, tok_s, mfu)."""
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar(*, total: int, initial: int = 0, enabled: bool = True, show_bar: bool = True) -> _Bar:
    """`enabled=False` on non-zero ranks silences everything; `show_bar=False` keeps the
    per-step lines on stdout without the bar."""
    return _Bar(total, initial, enabled, show_bar)
