"""The run directory: created up front, with the resolved config saved for reproducibility."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tunewright.training.atomic import atomic_write_text
from tunewright.training.distributed import is_main


def prepare_output_dir(cfg: Any) -> Path:
    out = Path(cfg.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(values)))
    return out
