"""`tune plot`: the same metrics give the same bytes, every logged step is one plotted point,
runs overlay, and a directory without metrics fails in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tunewright.tune_cli import plot  # noqa: E402
from tunewright.tune_cli.main import main  # noqa: E402


def write_run(run_dir: Path, *, steps: int, shift: float = 0.0, val_every: int = 5, rewards: bool = False) -> None:
    """A metrics.jsonl as training/metrics.py writes it: step lines, val lines, a null loss."""
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        record = {"step": s, "loss": 3 * math.exp(-s / 10) + shift, "lr": 1e-4 * s / steps,
                  "tokens_per_second": 100.0 + s, "num_tokens": 64, "time": 1.8e9 + s}
        if rewards:
            record.update({"reward": s / steps, "reward_std": 0.1, "rewards/math/mean": s / steps})
        lines.append(record)
        if s % val_every == 0:
            lines.append({"step": s, "val_loss": 2.0 - s / 100, "time": 1.8e9 + s})
    lines[2]["loss"] = None  # a skipped step: NaN is written as null
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def lines_by_panel(fig) -> dict[str, list]:
    return {ax.get_title(): ax.get_lines() for ax in fig.axes if ax.get_visible()}


def test_points_equal_logged_steps(tmp_path: Path) -> None:
    write_run(tmp_path / "a", steps=23)
    series = plot.read_metrics(tmp_path / "a")
    fig = plot.plot_runs({"a": series}, plot.default_keys([series]))
    panels = lines_by_panel(fig)
    assert list(panels) == ["loss", "val_loss", "lr", "tokens_per_second"]
    # Independent of the plotting code: counted from the file itself.
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for key, lines in panels.items():
        logged = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        (line,) = lines
        assert list(line.get_xdata()) == [s for s, _ in logged], key
        assert list(line.get_ydata()) == pytest.approx([v for _, v in logged]), key
    assert len(panels["loss"][0].get_xdata()) == 22  # 23 steps, one null loss
    assert len(panels["val_loss"][0].get_xdata()) == 4


def test_two_runs_overlay_labelled_by_dir(tmp_path: Path) -> None:
    write_run(tmp_path / "a", steps=10)
    write_run(tmp_path / "b", steps=15, shift=0.5)
    runs = {str(tmp_path / d): plot.read_metrics(tmp_path / d) for d in ("a", "b")}
    fig = plot.plot_runs(runs, plot.default_keys(list(runs.values())))
    for key, lines in lines_by_panel(fig).items():
        assert [line.get_label() for line in lines] == list(runs), key
    loss_a, loss_b = lines_by_panel(fig)["loss"]
    assert len(loss_a.get_xdata()) == 9 and len(loss_b.get_xdata()) == 14


def test_smoothing_is_tensorboards_ema(tmp_path: Path) -> None:
    write_run(tmp_path / "a", steps=10)
    series = plot.read_metrics(tmp_path / "a")
    fig = plot.plot_runs({"a": series}, ["loss", "lr"], smooth=0.6)
    raw, smoothed = lines_by_panel(fig)["loss"]
    values = [v for _, v in series["loss"]]
    expected, last = [], 0.0
    for n, v in enumerate(values, start=1):  # debiased EMA, written out from its definition
        last = 0.6 * last + 0.4 * v
        expected.append(last / (1 - 0.6**n))
    assert list(raw.get_ydata()) == values and raw.get_label().startswith("_")  # faint, unlabelled
    assert list(smoothed.get_ydata()) == pytest.approx(expected) and smoothed.get_label() == "a"
    assert len(lines_by_panel(fig)["lr"]) == 1  # a schedule is drawn as logged


def test_rl_runs_plot_rewards_not_their_spread(tmp_path: Path) -> None:
    write_run(tmp_path / "g", steps=6, rewards=True)
    keys = plot.default_keys([plot.read_metrics(tmp_path / "g")])
    assert keys == ["loss", "val_loss", "lr", "tokens_per_second", "reward", "rewards/math/mean"]


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_same_input_same_bytes(tmp_path: Path, suffix: str) -> None:
    write_run(tmp_path / "a", steps=12)
    write_run(tmp_path / "b", steps=12, shift=0.2)
    outs = [tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"]
    for out in outs:
        assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--smooth", "0.5"]) == 0
    first, second = (o.read_bytes() for o in outs)
    assert first == second
    assert first.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in first
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_metrics_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no metrics.jsonl" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "x.png").exists()


def test_no_numeric_keys_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "note": "x"}\n{"step": 2, "loss": null}\n')
    assert main(["plot", str(tmp_path / "r"), "-o", str(tmp_path / "x.svg")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no numeric" in err


def test_bad_suffix_and_unknown_key(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "a", steps=3)
    assert main(["plot", str(tmp_path / "a"), "-o", str(tmp_path / "x.pdf")]) != 0
    assert ".png or .svg" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "a"), "-o", str(tmp_path / "x.png"), "--keys", "los"]) != 0
    err = capsys.readouterr().err
    assert "no run logged los" in err and "loss" in err
