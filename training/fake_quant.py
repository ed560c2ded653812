"""torchao's fake quantizers for the CPU schemes, computed in fewer passes, bit for bit the same.

torchao 0.18's `IntxFakeQuantizer` (per-group symmetric int4 weights, per-token asymmetric int8
activations) is a chain of ~10 unfused elementwise ops: two reductions for the range, then
`x * (1/s)`, round, `+ zp`, clamp, copy, `- zp`, `* s`, each writing a full-size tensor that
autograd keeps for backward, and a backward that rebuilds the clamp's mask from the saved
tensor. On a CPU that memory traffic costs as much as the matmuls it feeds (bench/qat_speed.py).

`fake_quantize` here computes the same values and the same gradient with one autograd node:
the range in one `aminmax` pass, the rounding in place on one buffer, and backward from a
saved boolean mask. Every op that decides a value is torchao's own op in torchao's order, in
the tensor's dtype (bf16 rounds after each step exactly as torchao's chain does), so:

    forward   (clamp(round(x * (1/s)) + zp, qmin, qmax) - zp) * s      (torchao: same ops)
    backward  where(mask, g * s, 0) * (1/s)                            (torchao's chain rule
              through `* s`, clamp's `where`, round's straight-through and `* (1/s)`)

with s and zp detached (torchao picks them under no_grad). tests/test_fake_quant.py checks
values and gradients against torchao's quantizers on random tensors, fp32 and bf16, with
all-zero groups, exact .5 ties and clamped values. torchao's modules stay in place (convert,
PTQ and `set_fake_quant` see its classes); only the quantizers' forward is this one.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def weight_scale(w: torch.Tensor, group_size: int, qmin: int, qmax: int) -> torch.Tensor:
    """torchao's `get_group_qparams_symmetric`: per group of `group_size` along the rows,
    s = max(|min|, |max|, 0) / ((qmax - qmin) / 2) floored at the dtype's smallest normal (its
    zero point is 0). Shape [rows, groups, 1] (a view of the weight's groups broadcasts)."""
    grouped = w.detach().view(w.shape[0], -1, group_size)
    lo, hi = torch.amin(grouped, dim=-1, keepdim=True), torch.amax(grouped, dim=-1, keepdim=True)
    lo_neg, hi_pos = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    scale = torch.max(-lo_neg, hi_pos) / (float(qmax - qmin) / 2)
    return torch.clamp(scale, min=torch.finfo(w.dtype).smallest_normal)


def token_qparams(x: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's `choose_qparams_affine(ASYMMETRIC)` per row of the last dimension:
    s = (max(hi, 0) - min(lo, 0)) / (qmax - qmin), zp = clamp(qmin - round(min(lo, 0) / s)).
    Shapes [..., 1]."""
    lo, hi = torch.amin(x.detach(), dim=-1, keepdim=True), torch.amax(x.detach(), dim=-1, keepdim=True)
    lo_neg, hi_pos = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    scale = (hi_pos - lo_neg) / float(qmax - qmin)
    scale = torch.clamp(scale, min=torch.finfo(x.dtype).smallest_normal)
    zero_point = torch.clamp(qmin - torch.round(lo_neg / scale), qmin, qmax)
    return scale, zero_point.to(torch.int32)


class _FakeQuantize(torch.autograd.Function):
    """x (grouped so that `scale`, `zero_point` broadcast) -> its fake-quantized values; the
    clamp's mask is saved instead of the pre-clamp tensor. `zero_point` None: 0 (symmetric),
    whose `+ 0` still turns round's -0.0 into 0.0 as torchao's does, and whose `- 0` changes
    no bit and is skipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,  # type: ignore[override]
                qmin: int, qmax: int) -> torch.Tensor:
        inv_scale = 1.0 / scale
        q = x * inv_scale
        q.round_().add_(0 if zero_point is None else zero_point)
        out = q.clamp(qmin, qmax)
        clamped = out.ne(q)  # not clamp's backward mask qmin <= q <= qmax (True for NaN, as there)
        del q
        if zero_point is not None:
            out.sub_(zero_point)
        out.mul_(scale)
        ctx.save_for_backward(clamped, scale, inv_scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        clamped, scale, inv_scale = ctx.saved_tensors
        return (grad * scale).masked_fill_(clamped, 0.0).mul_(inv_scale), None, None, None, None


def fake_quantize_weight(w: torch.Tensor, group_size: int, qmin: int, qmax: int) -> torch.Tensor:
    """torchao's IntxFakeQuantizer(PerGroup, symmetric) on a [out, in] weight."""
    grouped = w.view(w.shape[0], -1, group_size)
    return _FakeQuantize.apply(grouped, weight_scale(w, group_size, qmin, qmax), None, qmin, qmax).view(w.shape)


def fake_quantize_tokens(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """torchao's IntxFakeQuantizer(PerToken, asymmetric) on activations [..., features]."""
    scale, zero_point = token_qparams(x, qmin, qmax)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def _bounds(config: object) -> tuple[int, int] | None:
    """(qmin, qmax) when this file computes `config` exactly as torchao does, else None: dynamic
    int configs without range learning, custom eps or scale dtype, per group symmetric
    (weights) or per token asymmetric (activations)."""
    from torchao.quantization.granularity import PerGroup, PerToken
    from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, ZeroPointDomain

    if not isinstance(config, IntxFakeQuantizeConfig) or not config.is_dynamic or config.range_learning or \
            config.eps is not None or config.scale_precision is not None or \
            config.zero_point_domain != ZeroPointDomain.INT:
        return None
    per_group = isinstance(config.granularity, PerGroup) and config.mapping_type == MappingType.SYMMETRIC
    per_token = isinstance(config.granularity, PerToken) and config.mapping_type == MappingType.ASYMMETRIC
    return _DTYPE_TO_QVALUE_BOUNDS[config.dtype] if per_group or per_token else None


@functools.cache
def _fused_class() -> type:
    """torchao's IntxFakeQuantizer (same config, `enabled` switch, and class for its convert)
    with this file's forward; made on first use, as torchao is an optional dependency."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    class FusedIntxFakeQuantizer(IntxFakeQuantizer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return x
            group_size = getattr(self.config.granularity, "group_size", None)
            if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or \
                    group_size is not None and (x.dim() != 2 or group_size < 2 or x.shape[-1] % group_size):
                return super().forward(x)  # torchao's own checks and messages
            qmin, qmax = _bounds(self.config)
            if group_size is None:
                return fake_quantize_tokens(x, qmin, qmax)
            return fake_quantize_weight(x, group_size, qmin, qmax)

    return FusedIntxFakeQuantizer


def fused_fake_quantizer(config: object) -> nn.Module:
    """The fake quantizer for `config`: this file's where it computes it, torchao's otherwise."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return _fused_class()(config) if _bounds(config) is not None else FakeQuantizerBase.from_config(config)


def use_fused_fake_quantizers(model: nn.Module) -> None:
    """Every torchao IntxFakeQuantizer in `model` that this file computes replaced by ours (same
    config and `enabled` state), in place."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    for module in model.modules():
        for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
            old = getattr(module, name, None)
            if type(old) is IntxFakeQuantizer and _bounds(old.config) is not None:
                new = fused_fake_quantizer(old.config)
                new.enabled = old.enabled
                setattr(module, name, new)


def use_torchao_fake_quantizers(model: nn.Module) -> None:
    """The reverse: torchao's own quantizers back in place of ours (the reference that
    tests/test_fake_quant.py and `bench/qat_speed.py --torchao` compare against)."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    for module in model.modules():
        for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
            old = getattr(module, name, None)
            if isinstance(old, _fused_class()):
                new = FakeQuantizerBase.from_config(old.config)
                new.enabled = old.enabled
                setattr(module, name, new)
