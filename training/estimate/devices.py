"""The devices an estimate is compared with (plain data: `tune --help` imports it, not torch).

GPU sizes are the memory `nvidia-smi` reports for each card (MiB); a CUDA context and the
allocator's slack take some of it, counted as a term of their own.
"""

from __future__ import annotations

GPUS: dict[str, tuple[str, int]] = {  # --device name -> (card, MiB nvidia-smi reports)
    "h100": ("NVIDIA H100 80GB", 81559),
    "h200": ("NVIDIA H200 141GB", 143771),
    "a100-80gb": ("NVIDIA A100 80GB", 81920),
    "a100-40gb": ("NVIDIA A100 40GB", 40960),
    "l4": ("NVIDIA L4 24GB", 23034),
    "rtx4090": ("NVIDIA GeForce RTX 4090 24GB", 24564),
}
CUDA_CONTEXT = 512 * 2**20  # CUDA context and allocator slack: a typical figure, not measured here
# What one CPU training process keeps above its imports, beside its model and tensors, measured
# once on the tiny full and LoRA sft runs (VmRSS, RssFile, RssAnon and glibc's mallinfo2 sampled
# around each phase; bench/estimate_vs_rss.py --phases, BENCHMARKS.md 2026-12-06): library code
# pages first touched (file-backed, +27-28 MiB: the estimate's own probe, datasets/arrow, the
# tokenizer, torch's forward/backward/optimizer kernels) and the live part of what the data set,
# tokenizer and set-up allocate (+7-10 MiB, tiny data set; more for a large one). Not in it: the
# ~17 MiB the set-up allocates and frees, which glibc keeps in its heap (reused by the full run's
# activations, not by the LoRA run's). Host memory, so CPU estimates only.
CPU_RUNTIME = 35 * 2**20


def human(num_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def device_capacity(name: str) -> tuple[str, int]:
    """(label, bytes) of `--device NAME`: `cpu` (this machine's memory) or a GPU of the table."""
    key = name.lower()
    if key == "cpu":
        import os

        return "cpu (this machine's memory)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if key not in GPUS:
        raise ValueError(f"--device: unknown GPU '{name}'; known: cpu, {', '.join(GPUS)}")
    card, mib = GPUS[key]
    return card, mib * 2**20
