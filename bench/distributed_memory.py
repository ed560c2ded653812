"""Memory per rank of an FSDP2-sharded model at 1, 2 and 4 processes (CPU, gloo).

    .venv/bin/python bench/distributed_memory.py [--procs 1 2 4] [--dim 1024 --layers 6]

A random Llama-shaped model (default 133M parameters, 508 MB in fp32) is saved once in Hugging
Face format; then, for each process count, `torchrun` starts that many workers which each build
the model on the meta device, shard it with FSDP2 (`training/parallel.py`), load their slices
of the checkpoint tensor by tensor (`training/sharded_io.py`) and take one AdamW step. Per rank
it reports:

- sharded state: the bytes of this rank's local parameters + gradients + AdamW moments (what
  FSDP divides by N; unsharded it is 4 x the parameter bytes);
- peak RSS: the process's resident-memory high-water mark (`ru_maxrss`), which also holds the
  Python/torch runtime, loading buffers (one tensor at a time) and activations;
- peak RSS above start: the same, minus the RSS after imports and process-group set-up, at the
  end of loading and over the whole run; it also counts the checkpoint's memory-mapped pages
  that each rank touches while reading (shared through the page cache, not per-rank memory);
- anonymous RSS above start after the step: this rank's own memory once the step is done.

Beyond the sharded state, each rank holds whole, while it runs: the root group (embeddings and
output head, gathered for forward and backward: half of this small model's weights, ~1/8 of
Llama-3.1-8B's), one or two gathered blocks, the activations, and one checkpoint tensor at a
time while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def anon_rss_mb() -> float:
    """Resident anonymous memory now: without the checkpoint's memory-mapped file pages, which
    every reader maps and the page cache shares between processes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def worker(model_dir: Path, result_dir: Path) -> None:
    import torch

    from tunewright.training import distributed as dist
    from tunewright.training.parallel import (build_mesh, build_meta_model, close_distributed,
                                              init_distributed, materialize, shard_fsdp2)
    from tunewright.training.sharded_io import load_hf_sharded

    torch.manual_seed(0)
    device, created = init_distributed(torch.device("cpu"))
    mesh = build_mesh(device, data_parallel_dim=None, tensor_parallel_dim=1)
    start, start_anon = rss_mb(), anon_rss_mb()
    model, _ = build_meta_model({"_component_": "tunewright.models.load_pretrained", "path": str(model_dir)},
                                torch.float32)
    shard_fsdp2(model, mesh["dp"])
    materialize(model, device)
    load_hf_sharded(model, model_dir, dtype=torch.float32)
    after_load = peak_rss_mb()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(dist.rank()))
    model(tokens).float().logsumexp(-1).mean().backward()
    optimizer.step()

    def local_bytes(tensors) -> int:
        return sum(t.to_local().numel() * t.element_size() for t in tensors if t is not None)

    params = list(model.parameters())
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    record = {
        "rank": dist.rank(), "params_mb": local_bytes(params) / MB,
        "grads_mb": local_bytes([p.grad for p in params]) / MB, "adam_mb": local_bytes(moments) / MB,
        "full_params_mb": sum(p.numel() * p.element_size() for p in params) / MB,
        "start_rss_mb": start, "peak_rss_after_load_mb": after_load, "peak_rss_mb": peak_rss_mb(),
        "anon_above_start_mb": anon_rss_mb() - start_anon,
    }
    (result_dir / f"rank_{dist.rank()}.json").write_text(json.dumps(record))
    close_distributed(created)


def make_checkpoint(out: Path, *, dim: int, layers: int) -> int:
    import torch

    from tunewright.models import ModelArgs, build_model, save_pretrained

    torch.manual_seed(0)
    args = ModelArgs(family="llama", vocab_size=32000, dim=dim, num_layers=layers, num_heads=dim // 64,
                     num_kv_heads=dim // 256, intermediate_dim=int(dim * 2.75) // 256 * 256)
    model = build_model(args, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    save_pretrained(model, out)
    return sum(p.numel() for p in model.parameters())


def run(procs: int, model_dir: Path, result_dir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(procs),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           __file__, "--worker", str(model_dir), str(result_dir)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank_*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(Path(a.worker[0]), Path(a.worker[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        num_params = make_checkpoint(model_dir, dim=a.dim, layers=a.layers)
        print(f"model: {num_params / 1e6:.0f}M parameters, {num_params * 4 / MB:.0f} MB in fp32; "
              f"unsharded params + grads + AdamW = {num_params * 16 / MB:.0f} MB")
        print("| processes | sharded state per rank (params+grads+AdamW, MB) | x unsharded "
              "| peak RSS per rank (MB) | peak RSS above start: load / whole run (MB) "
              "| anonymous RSS above start after the step (MB) |")
        print("|---|---|---|---|---|---|")
        for n in a.procs:
            result_dir = Path(tmp) / f"result_{n}"
            result_dir.mkdir()
            ranks = run(n, model_dir, result_dir)
            state = max(r["params_mb"] + r["grads_mb"] + r["adam_mb"] for r in ranks)
            unsharded = 4 * ranks[0]["full_params_mb"]
            peak = max(r["peak_rss_mb"] for r in ranks)
            above = max(r["peak_rss_mb"] - r["start_rss_mb"] for r in ranks)
            load = max(r["peak_rss_after_load_mb"] - r["start_rss_mb"] for r in ranks)
            anon = max(r["anon_above_start_mb"] for r in ranks)
            print(f"| {n} | {state:.0f} | {state / unsharded:.3f} (1/{n} = {1 / n:.3f}) "
                  f"| {peak:.0f} | {load:.0f} / {above:.0f} | {anon:.0f} |", flush=True)


if __name__ == "__main__":
    main()
