"""fp32 linear on the CPU: aten's (MKL sgemm) against oneDNN's (`modules/onednn_linear.py`).

    .venv/bin/python bench/cpu_linear.py [--threads 2] [--repeats 20]

The SmolLM2-135M shape: one decode step's products at 32 rows (30 blocks' q, k, v, o, gate, up,
down, each block its own weights, so they come from memory as in a real step), the tied head
over 49,152 ids, one gate projection at 1 to 512 rows, and a training step's three products of
that projection at 512 and 2,048 rows (forward, the input's gradient dY W, the weight's dY^T x;
oneDNN is used for none of them today: `modules/onednn_linear.py` leaves gradients to aten). Prints milliseconds per call for
each path, median of `--repeats` after a warm-up, and the largest difference of the results.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def timed(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    g = torch.Generator().manual_seed(0)
    dim, hidden, kv, vocab = 576, 1536, 192, 49152
    blocks = [{name: torch.randn(shape, generator=g) for name, shape in
               [("q", (dim, dim)), ("k", (kv, dim)), ("v", (kv, dim)), ("o", (dim, dim)),
                ("gate", (hidden, dim)), ("up", (hidden, dim)), ("down", (dim, hidden))]} for _ in range(30)]
    head = torch.randn(vocab, dim, generator=g)
    x, h = torch.randn(32, dim, generator=g), torch.randn(32, hidden, generator=g)

    def step(linear: Callable) -> None:
        for w in blocks:
            for name in ("q", "k", "v", "o", "gate", "up"):
                linear(x, w[name])
            linear(h, w["down"])

    print(f"{args.threads} threads, ms per call (median of {args.repeats}): aten (MKL) / oneDNN")
    print(f"30 blocks' products, 32 rows: {timed(lambda: step(F.linear), args.repeats):.1f} / "
          f"{timed(lambda: step(onednn), args.repeats):.1f}")
    print(f"tied head, 32 rows x {vocab}: {timed(lambda: F.linear(x, head), args.repeats):.1f} / "
          f"{timed(lambda: onednn(x, head), args.repeats):.1f}, "
          f"max |diff| {(F.linear(x, head) - onednn(x, head)).abs().max().item():.1e}")
    gate = blocks[0]["gate"]
    for rows in (1, 8, 32, 64, 256, 512):
        xs = torch.randn(rows, dim, generator=g)
        print(f"gate projection, {rows} rows: {timed(lambda: F.linear(xs, gate), 5 * args.repeats):.3f} / "
              f"{timed(lambda: onednn(xs, gate), 5 * args.repeats):.3f}")
    for rows in (512, 2048):
        xs, grad = torch.randn(rows, dim, generator=g), torch.randn(rows, hidden, generator=g)
        print(f"training shapes, {rows} rows: forward {timed(lambda: F.linear(xs, gate), args.repeats):.2f} / "
              f"{timed(lambda: onednn(xs, gate), args.repeats):.2f}, "
              f"dY W {timed(lambda: grad @ gate, args.repeats):.2f} / "
              f"{timed(lambda: onednn(grad, gate.t()), args.repeats):.2f}, "
              f"dY^T x {timed(lambda: grad.t() @ xs, args.repeats):.2f} / "
              f"{timed(lambda: onednn(grad.t(), xs.t()), args.repeats):.2f}")


if __name__ == "__main__":
    main()
