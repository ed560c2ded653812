"""Run a recipe file as torchrun would (`recipe.py --config CFG k=v ...`), with one rank stopping
in the middle of training, for tests/test_distributed_resume.py.

    torchrun ... recipe_with_fault.py RECIPE.py --config CFG k=v ...
    env: FAULT_AFTER_STEPS=N  FAULT_RANK=R  FAULT=hang|raise

After N optimizer steps of this launch, rank R either writes its pid to `<output_dir>/hang.pid`
and sleeps (`hang`: the test SIGKILLs it; the other ranks wait in the next step's collective),
or every rank raises `KeyboardInterrupt` (`raise`: a run stopped by hand).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tunewright.training import distributed as dist
from tunewright.training.entry import recipe_main
from tunewright.training.trainer import Trainer


def install_fault(after_steps: int, rank: int, mode: str) -> None:
    real_step = Trainer.train_step
    calls = [0]

    def train_step(self: Trainer, micro):
        calls[0] += 1
        if calls[0] > after_steps:
            if mode == "raise":
                raise KeyboardInterrupt("stopped by the test")
            if dist.rank() == rank:
                (Path(self.s.output_dir) / "hang.pid").write_text(str(os.getpid()))
                time.sleep(600)
        return real_step(self, micro)

    Trainer.train_step = train_step


if __name__ == "__main__":
    recipe = sys.argv.pop(1)
    install_fault(int(os.environ["FAULT_AFTER_STEPS"]), int(os.environ.get("FAULT_RANK", "0")),
                  os.environ.get("FAULT", "hang"))
    recipe_main(recipe)
