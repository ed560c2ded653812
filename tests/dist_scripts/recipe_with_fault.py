"""Run a recipe file as torchrun would (`recipe.py --config CFG k=v ...`), with one rank stopping
in the middle of training, for tests/test_distributed_resume.py.

    torchrun ... recipe_with_fault.py RECIPE.py --config CFG output_dir=DIR k=v ...
    env: FAULT_AFTER_STEPS=N  FAULT_RANK=R  FAULT=hang|raise

After N optimizer steps of this launch, rank R either writes its pid to `<output_dir>/hang.pid`
and sleeps (`hang`: the test SIGKILLs it; the other ranks wait in the next step's collective),
or every rank raises `KeyboardInterrupt` (`raise`: a run stopped by hand). The fault sits in the
(N+1)-th call of `training.optim.optimizer_step`, after that step's backward.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tunewright.training import distributed as dist
from tunewright.training import optim
from tunewright.training.entry import recipe_main


def install_fault(after_steps: int, rank: int, mode: str, output_dir: Path) -> None:
    real_step = optim.optimizer_step  # recipes import it from the module when `main` runs
    calls = [0]

    def optimizer_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after_steps:
            if mode == "raise":
                raise KeyboardInterrupt("stopped by the test")
            if dist.rank() == rank:
                (output_dir / "hang.pid").write_text(str(os.getpid()))
                time.sleep(600)
        return real_step(*args, **kwargs)

    optim.optimizer_step = optimizer_step


if __name__ == "__main__":
    recipe = sys.argv.pop(1)
    out = next(Path(a.split("=", 1)[1]) for a in sys.argv if a.startswith("output_dir="))
    install_fault(int(os.environ["FAULT_AFTER_STEPS"]), int(os.environ.get("FAULT_RANK", "0")),
                  os.environ.get("FAULT", "hang"), out)
    recipe_main(recipe)
