"""fp32 linear layers through oneDNN instead of MKL on the CPU, for inference-only work
(rollouts, generation).

    with onednn_linears(device, dtype):
        logits = model(ids, cache_pos=pos)

Every `F.linear` on plain fp32 CPU tensors with gradients off goes to oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's CPU fusions call) rather than
MKL's sgemm, which `aten::linear` takes for fp32. Measured on this project's 2-core AMD EPYC
(AVX-512; `bench/cpu_linear.py`, BENCHMARKS.md), the SmolLM2-135M shape at 32 rows, one decode
step's products: 30 blocks 57-62 vs 68-89 ms, the tied head over 49,152 ids 13-15 vs 24-29 ms;
at 256-512 rows 5-28% less. Both compute the same sums in another order (the results agree to
fp32 rounding, tested); it is applied where nothing is differentiated, so a training step keeps
aten's linear and its backward.

A torch function mode, not a swapped module: LoRA, QAT's fake-quantized and plain layers all
call `F.linear`, and a compiled block traces the call as it is. A weight of another type
(NF4, torchao's quantized tensors) or dtype, a bias of another dtype, or gradients on: the
call goes through untouched, and so does every call under CPU autocast (mixed precision casts
inside aten's linear).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # Under CPU autocast aten's linear is what casts to bf16: leave those calls to it.
        if func is F.linear and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _plain(x) and _plain(weight) and weight.dim() == 2 and (bias is None or _plain(bias)):
                flat = x.reshape(-1, x.shape[-1])
                # Compiled (a block under `compile: true`): through an opaque op, since inductor's
                # lowering of the oneDNN op expects the weights it packs itself when freezing.
                linear = _opaque_linear if torch.compiler.is_compiling() else _linear
                return linear(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("tunewright::onednn_linear", mutates_args=())
def _opaque_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear(x, weight, bias)


@_opaque_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"


@contextlib.contextmanager
def onednn_linears(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """oneDNN's linear for fp32 on the CPU within the block; elsewhere (GPU, half precision,
    a torch built without oneDNN) nothing changes."""
    if not available(device, dtype):
        yield
        return
    with OneDNNLinear():
        yield
