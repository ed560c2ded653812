"""Model FLOPs utilisation: the model's FLOPs per second over what the device can do.

    mfu = tokens_per_second * flops_per_token / peak_flops

FLOPs per token count the weights' matrix multiplies (Kaplan et al.'s 6N, spelled out so LoRA,
frozen models and MoE come out right). A weight matrix with n entries costs, per token:

- forward: 2n (a multiply and an add per entry);
- backward, gradient of its input: 2n, needed whenever anything before it trains, so every
  weight of a model that trains (the first block's frozen weights in LoRA need it only for
  their outputs' adapters: an upper bound of one block's 2n);
- backward, gradient of the weight itself: 2n, only when it trains.

So a trained weight costs 6n, a frozen weight in a model that trains 4n (LoRA's base: 4N, not
6N, plus 6 per adapter entry), and a model that does not train (a reference or teacher in the
run's state) 2n. Only matrices count: embedding lookups are gathers (0 FLOPs), norms and
biases are elementwise; a tied output head is a matmul with the embedding matrix and counts.
Mixture-of-experts weights count for the `top_k / num_experts` share a token visits.

Attention scores add PaLM's 12·L·d·T per token for a trained model (appendix B: QKᵀ and AV,
2·T·d each forward, times 3 with backward), 4·L·d·T forward-only, with d = heads × head_dim and
T the row length; `flops_per_token(..., seq_len=T)` includes them. The progress bar's MFU does
not: a step reports its tokens, not its rows' lengths, so it is a lower bound, short of the
full count by 12·L·d·T / 6N (full fine-tune; 13% for SmolLM2-135M at T=512). Generation inside a
step (GRPO/PPO rollouts) is not counted either.

The peak is the device's dense matmul rate in the run's compute dtype: NVIDIA's datasheet for
the GPUs in `PEAK_TFLOPS` (bf16/fp16, TF32, or FP32 as `dtype`/`tf32` ask), or, on CPU, a
matmul probe measured once per process with the threads the run uses. `TUNEWRIGHT_PEAK_TFLOPS`
overrides both (any device). Each rank's MFU is its own: its tokens per second (of its
data-parallel shard) times the FLOPs per token, divided by the tensor-parallel degree.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Iterable

import torch
from torch import nn

PEAK_ENV = "TUNEWRIGHT_PEAK_TFLOPS"
# Dense (no 2:4 sparsity) TFLOP/s from NVIDIA's datasheets: (name pattern, bf16/fp16, tf32, fp32).
# Order matters: the first pattern found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS: tuple[tuple[str, float, float, float], ...] = (
    (r"H100.*PCIe", 756.0, 378.0, 51.0),
    (r"H100.*NVL", 835.0, 418.0, 60.0),
    (r"H100", 989.4, 494.7, 66.9),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200", 989.4, 494.7, 66.9),
    (r"A100", 312.0, 156.0, 19.5),
    (r"\bL4\b", 121.0, 60.0, 30.3),
    (r"4090", 165.2, 82.6, 82.6),  # bf16 with fp32 accumulation, as training runs it
)


def _weight_counts(model: nn.Module) -> tuple[float, float]:
    """(trained, frozen) matmul weight entries one token goes through."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A tied output head (modules/decoder.py: `output` None) is a matmul with the embedding
    # matrix, unlike the lookup.
    tied = getattr(model, "output", False) is None and isinstance(getattr(model, "tok_embeddings", None), nn.Embedding)
    head = model.tok_embeddings.weight if tied else None
    share: dict[int, float] = {}  # parameter id -> the share of tokens that use it (MoE experts)
    for module in model.modules():
        experts, top_k = getattr(module, "experts", None), getattr(module, "top_k", None)
        if isinstance(experts, nn.Module) and isinstance(top_k, int) and hasattr(experts, "num_experts"):
            for p in experts.parameters():
                share[id(p)] = top_k / experts.num_experts
    trained = frozen = 0.0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2:
            continue
        seen.add(id(p))
        if id(p) in embeddings and (head is None or p is not head):
            continue
        n = p.numel() * share.get(id(p), 1.0)
        if p.requires_grad:
            trained += n
        else:
            frozen += n
    return trained, frozen


def _attention_width(model: nn.Module) -> int:
    """L·d: the sum over attention layers of heads × head_dim (modules/attention.py's)."""
    return sum(m.num_heads * m.head_dim for m in model.modules()
               if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int))


def flops_per_token(models: Iterable[nn.Module], *, seq_len: int | None = None) -> float:
    """Training FLOPs one token costs in `models` (the run's state), by the counts above."""
    total = 0.0
    for model in models:
        trained, frozen = _weight_counts(model)
        trains = trained > 0
        total += 6 * trained + (4 if trains else 2) * frozen
        if seq_len:  # sliding-window layers attend to fewer keys: an upper bound there
            total += (12 if trains else 4) * _attention_width(model) * seq_len
    return total


def gpu_peak_flops(name: str, dtype: str, tf32: bool) -> float | None:
    """The datasheet peak of the GPU called `name` for compute in `dtype`; None if unknown."""
    for pattern, half, tf, fp32 in PEAK_TFLOPS:
        if re.search(pattern, name):
            return 1e12 * (half if dtype in ("bf16", "fp16") else tf if tf32 else fp32)
    return None


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype: str = "fp32", num_threads: int | None = None, size: int = 512) -> float:
    """The best rate of a `size`² matmul in `dtype` on this CPU (a few tenths of a second, once
    per process and thread count): what a well-shaped matmul achieves here, the CPU's peak."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    b = a.t().contiguous()
    torch.mm(a, b)  # warm-up: thread pool, kernel choice
    best = float("inf")
    deadline = time.perf_counter() + 0.3
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: str = "fp32", *, tf32: bool = True) -> tuple[float | None, str]:
    """The peak FLOP/s of `device` and where it came from (for one line at the start)."""
    if os.environ.get(PEAK_ENV):
        try:
            return float(os.environ[PEAK_ENV]) * 1e12, PEAK_ENV
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r} must be a number of TFLOP/s") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype, tf32)
        return peak, (f"{name} datasheet" if peak else f"no peak known for {name}: set {PEAK_ENV}")
    if device.type == "cpu":
        return cpu_peak_flops(dtype, torch.get_num_threads()), "matmul probe"
    return None, f"no peak known for {device.type}: set {PEAK_ENV}"


class MFU:
    """mfu(tokens_per_second) for the models of a run's state, on their device."""

    def __init__(self, models: Iterable[nn.Module], *, dtype: str = "fp32", tf32: bool = True) -> None:
        from tunewright.training import distributed as dist

        models = list(models)
        # Tensor parallelism splits each matmul over the ranks that see the same tokens: this
        # rank does 1/tp of the FLOPs of the tokens it counts.
        tensor_parallel = max(1, dist.world_size() // dist.data_world_size())
        self.flops_per_token = flops_per_token(models) / tensor_parallel
        params = [p for m in models for p in m.parameters()]
        device = params[0].device if params else torch.device("cpu")
        self.peak, self.source = peak_flops(device, dtype, tf32=tf32)

    def __call__(self, tokens_per_second: float) -> float | None:
        if not self.peak or not self.flops_per_token:
            return None
        return tokens_per_second * self.flops_per_token / self.peak

    def record(self, tokens_per_second: float) -> dict[str, float]:
        """`{"mfu": value}` for a metrics record; empty when the peak is unknown."""
        value = self(tokens_per_second)
        return {} if value is None else {"mfu": value}

    def describe(self) -> str:
        peak = f"{self.peak / 1e12:.3g} TFLOP/s peak ({self.source})" if self.peak else self.source
        return f"mfu: {self.flops_per_token / 1e6:.4g} MFLOP per token against {peak}"
