"""`tune plot RUN_DIR [RUN_DIR ...] -o loss.png [--smooth W] [--keys K ...]`.

Draws loss, val_loss, lr, tokens/s and, for RL runs, the rewards (`reward`, `val_reward`,
`rewards/<name>/mean`, ...: every `reward*` / `val_reward*` key except spreads `*std`)
against step from each run's `metrics.jsonl`, one panel per key, every run overlaid and
labelled by its directory as given. `--smooth W` adds TensorBoard's debiased exponential moving
average with weight W (0 <= W < 1) over the raw curve (drawn faint); the lr panel stays raw.

The figure is PNG or SVG by the output's suffix. The same metrics give the same bytes: no
dates in the metadata, a fixed SVG hash salt, the Agg backend and matplotlib's bundled font.
matplotlib is an optional extra (`pip install tunewright[plot]`), imported only here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # training/metrics.py's; not imported: it pulls in torch
# Panels in this order, when some run logged them; reward keys follow.
DEFAULT_KEYS = ("loss", "val_loss", "lr", "tokens_per_second")
MARKED = 20  # series of at most this many points get a dot per point
UNSMOOTHED = {"lr"}  # a schedule is exact; averaging would only shift it
SUFFIXES = (".png", ".svg")

Series = dict[str, list[tuple[int, float]]]  # key -> [(step, value)], steps ascending


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot", help="plot loss, lr, tokens/s (and rewards) of runs from their metrics.jsonl",
        description="Draw loss, val_loss, lr, tokens_per_second and any reward keys against step "
        "from each RUN_DIR/metrics.jsonl (several runs overlaid) into a PNG or SVG.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="loss.png or loss.svg")
    p.add_argument("--smooth", type=float, default=0.0, metavar="W",
                   help="exponential moving average weight in [0, 1) (TensorBoard's smoothing; 0: off)")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="plot these metrics instead (any numeric key of metrics.jsonl)")
    p.set_defaults(handler=run)
    return p


def read_metrics(run_dir: str | Path) -> Series:
    """Every numeric key of `run_dir/metrics.jsonl` as (step, value) pairs. A value logged null
    (NaN or infinite: a skipped step) is left out; a key logged twice for one step keeps the last."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise ValueError(f"tune plot: {run_dir} is not a directory (give a run's output_dir)")
    if not path.is_file():
        raise ValueError(f"tune plot: {run_dir} has no {METRICS_FILE} (is it a run's output_dir?)")
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"tune plot: {path} line {number} is not JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"tune plot: {path} line {number} has no integer 'step'")
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def default_keys(runs: list[Series]) -> list[str]:
    """The DEFAULT_KEYS any run has, then its reward keys in first-seen order."""
    present: dict[str, None] = {}
    for series in runs:
        present.update(dict.fromkeys(series))
    rewards = [k for k in present if k.startswith(("reward", "val_reward")) and not k.endswith("std")]
    return [k for k in DEFAULT_KEYS if k in present] + rewards


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the data."""
    out, last, num = [], 0.0, 0
    for v in values:
        num += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**num) if weight > 0 else v)
    return out


def plot_runs(runs: dict[str, Series], keys: list[str], *, smooth: float = 0.0) -> Any:
    """A matplotlib Figure: one panel per key, one labelled line per run that logged the key
    (with `smooth`, the smoothed line is labelled and the raw one drawn faint without a label)."""
    # A bare Figure, not pyplot: no display, no global state; savefig renders PNG with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = 1 if len(keys) == 1 else 2
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for i, (label, series) in enumerate(runs.items()):
            points = series.get(key)
            if not points:
                continue
            steps, values = [s for s, _ in points], [v for _, v in points]
            color = f"C{i % 10}"
            if smooth and key not in UNSMOOTHED:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                values = ema(values, smooth)
            # Dots where points are few (evaluations, a short run): a lone point draws no line.
            ax.plot(steps, values, color=color, linewidth=1.5, label=label,
                    marker="o" if len(steps) <= MARKED else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return fig


def save_figure(fig: Any, output: Path) -> None:
    """PNG or SVG with no date in it, written to a temporary name and renamed."""
    import matplotlib

    suffix = output.suffix.lower()
    # No creation date; SVG element ids come from a fixed salt instead of a random one.
    metadata = {"Date": None} if suffix == ".svg" else {"Software": None}
    tmp = output.with_name(f".{output.name}.tmp")
    with matplotlib.rc_context({"svg.hashsalt": "tunewright", "svg.fonttype": "path"}):
        fig.savefig(tmp, format=suffix[1:], metadata=metadata, dpi=100)
    tmp.replace(output)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in SUFFIXES:
        raise ValueError(f"tune plot: -o {output} must end in .png or .svg")
    if not 0.0 <= args.smooth < 1.0:
        raise ValueError(f"tune plot: --smooth {args.smooth} must be in [0, 1) (0.6 is TensorBoard's usual)")
    runs: dict[str, Series] = {}
    for run_dir in args.run_dirs:
        runs[str(run_dir)] = read_metrics(run_dir)
    keys = args.keys or default_keys(list(runs.values()))
    if not keys:
        raise ValueError(f"tune plot: no numeric loss, val_loss, lr, tokens_per_second or reward values in "
                         f"{', '.join(args.run_dirs)}/{METRICS_FILE}; name the metrics with --keys")
    missing = [k for k in keys if not any(series.get(k) for series in runs.values())]
    if missing:
        known = sorted({k for series in runs.values() for k in series})
        raise ValueError(f"tune plot: no run logged {', '.join(missing)} with a numeric value; "
                         f"logged: {', '.join(known) or 'nothing'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("tune plot needs matplotlib: pip install 'tunewright[plot]'") from None
    save_figure(plot_runs(runs, keys, smooth=args.smooth), output)
    print(f"wrote {output}: {', '.join(keys)} of {len(runs)} run(s)")
    return 0
