"""Mixed precision: which dtype the weights the optimizer updates are kept in, and which dtype
the model computes in.

    dtype: bf16, master_dtype: fp32   (the default for bf16)  weights that train, their
        gradients and the optimizer state stay fp32; matmuls run in bf16. Frozen weights
        (a LoRA base) are stored in bf16 only: nothing ever updates them.
    dtype: bf16, master_dtype: bf16   pure bf16, torchtune's `dtype: bf16`: half the memory
        of the weights that train, but an update smaller than bf16's resolution of a weight
        (2^-8 of it) is lost, so small learning rates stall.
    dtype: fp32                       everything fp32 (TF32 matmuls on NVIDIA GPUs unless
        tf32: false).

How the bf16 compute happens: on one device the model runs under `torch.autocast` (the
Decoder enters it, and so do the loss functions for the output head,
`modules/precision.py`); autocast caches each weight's bf16 copy for the step. Under FSDP2
the sharded fp32 weights are gathered in bf16 (`MixedPrecisionPolicy(param_dtype=bf16)`), so
no autocast is needed, and gradients are reduce-scattered in `reduce_dtype` (fp32 by default,
as torchtitan does; bf16 halves that traffic).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunewright.models.pretrained import as_dtype
from tunewright.modules.precision import set_autocast_dtype


class Precision:
    """The run's dtypes: `compute` (the `dtype` key), `master` (trainable weights and optimizer
    state), `reduce` (FSDP2 gradient reduction)."""

    def __init__(self, dtype: str, master_dtype: str | None = None, reduce_dtype: str = "fp32") -> None:
        self.compute = as_dtype(dtype)
        if self.compute == torch.float16:
            raise ValueError("dtype: fp16 training needs loss scaling, which is not supported; use bf16 or fp32")
        self.master = as_dtype(master_dtype) if master_dtype is not None else self.compute
        if self.master.itemsize < self.compute.itemsize:
            raise ValueError(f"master_dtype: {master_dtype} with dtype: {dtype} would keep the weights that "
                             f"train in less precision than the model computes in; use master_dtype: {dtype}")
        self.reduce = as_dtype(reduce_dtype)

    @classmethod
    def from_config(cls, cfg: Any) -> "Precision":
        # Training configs have master_dtype (default fp32); evaluation and generation do not:
        # nothing trains there, so everything is stored in `dtype`.
        return cls(cfg.dtype, getattr(cfg, "master_dtype", None), getattr(cfg, "reduce_dtype", "fp32"))

    @property
    def mixed(self) -> bool:
        return self.master != self.compute

    def load_dtype(self, *, full: bool) -> torch.dtype:
        """The dtype to read pretrained weights in: the master dtype when every weight trains
        (an fp32 checkpoint keeps its bits), else the compute dtype (frozen weights stay there;
        adapters are raised to the master dtype after they are added)."""
        return self.master if full else self.compute

    def apply(self, model: nn.Module, *, autocast: bool = True) -> int:
        """Trainable floating-point weights -> the master dtype (in place, before the optimizer
        exists), and, where they now differ from the compute dtype, the model computes under
        autocast (`autocast=False` under FSDP2, whose policy casts instead). Returns how many
        weights were raised."""
        raised = 0
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != self.master:
                param.data = param.data.to(self.master)
                raised += 1
        if autocast and self.mixed:
            set_autocast_dtype(model, self.compute)
        return raised

    def fsdp_policy(self) -> Any:
        """FSDP2's MixedPrecisionPolicy for this run, or None when weights are gathered as stored."""
        if not self.mixed:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=self.reduce)

    def describe(self) -> str:
        if not self.mixed:
            return f"precision: {_name(self.compute)} throughout"
        return (f"precision: {_name(self.compute)} compute, {_name(self.master)} weights that train and "
                "optimizer state (master_dtype)")


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def enable_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 matmuls and convolutions on NVIDIA GPUs in TF32 (10-bit mantissa inputs, fp32
    accumulation: about 8x the fp32 throughput of an H100); nothing changes on CPU."""
    if device.type != "cuda":
        return
    precision = "tf32" if enabled else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
