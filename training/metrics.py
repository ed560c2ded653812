"""One logging path for every recipe: `<output_dir>/metrics.jsonl`, stdout, optional extra sink
(`training/run.py`'s `Run.log` writes through it).

Each `Run.log` call is one JSON object with `step` and `time` (unix time) and whatever the
recipe logged; the SFT recipe's step lines have `loss`, `lr`, `grad_norm`, `tokens_per_second`,
`num_tokens` (non-padding tokens) and `num_tokens_total` (tokens computed, padding included), so
external harnesses can time steps by wall clock. Only rank 0 writes.

Every line is strict JSON: a NaN or infinite value (a skipped step's loss) is written as null
(bare `NaN` is no JSON), while the console shows `nan`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunewright.training.atomic import atomic_write_text, disk_full_error, is_disk_full
from tunewright.training.distributed import is_main

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None, sink: Any = None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.sink = sink  # torchtune-style logger: log_dict(payload, step), close()
        self.enabled = is_main()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """A resumed run continues the same file; lines logged after the checkpoint (by the run
        that crashed) are dropped so every step appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(strict_json(record), allow_nan=False) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path, len(line)) from None
            raise
        if self.sink is not None:
            self.sink.log_dict({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.sink is not None and hasattr(self.sink, "close"):
                self.sink.close()


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


# Printed first and in this form; other keys a recipe logs follow in the order it gave them.
_FORMATS = {"loss": "{:.4f}", "val_loss": "{:.4f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
            "tokens_per_second": "{:.0f}"}
# In metrics.jsonl, not on the console.
_QUIET = {"step", "epoch", "time", "step_time", "num_tokens", "num_tokens_total", "num_targets", "peak_rss_mb"}


def format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in _FORMATS.items():
        if record.get(key) is not None:
            parts.append(f"{key} " + fmt.format(record[key]))
    for key, value in record.items():
        if key in _FORMATS or key in _QUIET or value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
