"""training/fake_quant.py against torchao 0.18's own fake quantizers (the reference it replaces):
values and gradients bit for bit, fp32 and bf16, on random tensors with the edge cases that
rounding gets wrong first (all-zero and negative-zero groups, exact .5 ties, values clamped at
the range's end, an odd zero point, scales floored at the smallest normal), and on a whole
prepared model (both CPU schemes, with LoRA's merged weights too)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunewright.training import quantize as Q

pytest.importorskip("torchao")

from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs  # noqa: E402
from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase, IntxFakeQuantizer  # noqa: E402

from tunewright.training.fake_quant import fused_fake_quantizer, use_torchao_fake_quantizers  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
ACT, WEIGHT = _infer_fake_quantize_configs(Q.base_config(Q.Quantization("int8_dynamic_act_int4_weight")))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != 0.0 and NaN payloads count."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def _assert_same_as_torchao(config: object, x: torch.Tensor) -> None:
    ours, theirs = fused_fake_quantizer(config), IntxFakeQuantizer(config)
    assert type(ours) is not IntxFakeQuantizer and isinstance(ours, IntxFakeQuantizer)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = ours(a), theirs(b)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(a.grad), _bits(b.grad))
    assert not torch.equal(want, x)  # the rounding is there


def _weight(dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(0)) * 0.02
    w[1, :32] = 0.0  # all-zero group: scale floored at the smallest normal
    w[2, 32:64] = -0.0
    w[3, :32] = torch.arange(32) % 16 - 7.5  # max |w| = 7.5: scale 1, every value a .5 tie, 7.5 -> 8 clamped
    w[4, 64:96] = torch.linspace(-2, 3, 32)
    w[4, 70] = -7.5  # -7.5 -> -8, in range
    w[5, :32] = 1e-39  # subnormal in fp32 (bf16 keeps it): scale floored, values rounded against eps
    w[6, :] = torch.arange(192) * 0.25 - 20  # many exact ties in other groups
    return w.to(dtype)


def _activations(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(2, 16, 96, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0] = 0.0  # all-zero token
    x[0, 1] = torch.linspace(0.5, 4, 96)  # positive only: min clipped to 0, zero point -128
    x[0, 2] = torch.arange(96) % 16 - 7.5 + 0.0
    x[0, 2, 0], x[0, 2, 1] = -127.5, 127.5  # scale exactly 1, zero point 0: .5 ties everywhere
    x[1, 0] = torch.arange(96) % 8 + 0.5
    x[1, 0, 0], x[1, 0, 1] = -1.0, 254.0  # scale 1, zero point -127 (odd): ties plus an odd shift
    x[1, 1] = -torch.linspace(0.1, 6, 96)  # negative only
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_fake_quantizer_equals_torchao_bit_for_bit(dtype: torch.dtype) -> None:
    _assert_same_as_torchao(WEIGHT, _weight(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_fake_quantizer_equals_torchao_bit_for_bit(dtype: torch.dtype) -> None:
    _assert_same_as_torchao(ACT, _activations(dtype))
    _assert_same_as_torchao(ACT, _activations(dtype)[0])  # 2-D input too


@pytest.mark.parametrize("group_size", [16, 64])
def test_other_group_sizes_and_weight_only_config_equal_torchao(group_size: int) -> None:
    (_, weight_only) = _infer_fake_quantize_configs(Q.base_config(Q.Quantization("int4_weight_only", group_size)))
    _assert_same_as_torchao(weight_only, _weight(torch.float32))


def test_configs_it_does_not_compute_stay_torchao() -> None:
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    for config in (IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False),
                   IntxFakeQuantizeConfig(torch.int4, group_size=32, scale_precision=torch.float32),
                   IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, is_dynamic=False)):
        assert type(fused_fake_quantizer(config)) is type(FakeQuantizerBase.from_config(config))


@pytest.mark.parametrize("scheme,dtype,lora", [(s, d, (i + j) % 2 == 1) for i, s in enumerate(Q.CPU_SCHEMES)
                                               for j, d in enumerate(DTYPES)])  # each with and without LoRA
def test_prepared_model_trains_as_with_torchao_quantizers(scheme: str, dtype: torch.dtype, lora: bool) -> None:
    from tunewright.models import load_pretrained
    from tunewright.modules.peft.apply import apply_lora, lora_modules
    from tunewright.training.tiny_assets import tiny_asset

    model = load_pretrained(tiny_asset("llama"), dtype=dtype)
    if lora:
        apply_lora(model, targets=["q", "v", "down"], rank=4, alpha=8)
        for _, layer in lora_modules(model):
            nn.init.normal_(layer.lora_b.weight, std=0.05, generator=torch.Generator().manual_seed(3))
    Q.prepare_qat(model, {"scheme": scheme, "group_size": 32, "embeddings": not lora})
    quantizers = [m for m in model.modules() if isinstance(m, IntxFakeQuantizer)]
    assert quantizers and all(type(m) is not IntxFakeQuantizer for m in quantizers)  # ours everywhere
    reference = copy.deepcopy(model)
    use_torchao_fake_quantizers(reference)
    assert not any(type(m) is not IntxFakeQuantizer for m in reference.modules() if isinstance(m, IntxFakeQuantizer))
    tokens = torch.randint(0, 288, (2, 19), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m(tokens).float().pow(2).mean().backward()
    assert torch.equal(_bits(model(tokens)), _bits(reference(tokens)))
    grads = [(n, p.grad, r.grad) for (n, p), r in zip(model.named_parameters(), reference.parameters())
             if p.requires_grad]
    assert grads and all(torch.equal(_bits(g), _bits(h)) for _, g, h in grads)
