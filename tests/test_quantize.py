"""training/quantize.py: torchao's QAT and PTQ as transforms of our generic decoder (the tiny
Llama), against independent references: after `convert` the model computes bit for bit what the
fake-quantized one did and what torchao's PTQ of the same weights does (fp32 and bf16, both CPU
schemes, with and without quantized embeddings; with LoRA, PTQ of the merged weights); the
rounding is the symmetric per-group int4 formula written out here; the saved quantized model reloads to the same logits; bad inputs are
one line each."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tunewright.training import quantize as Q

pytest.importorskip("torchao")


def _tiny(dtype: torch.dtype) -> nn.Module:
    from tunewright.models import load_pretrained
    from tunewright.training.tiny_assets import tiny_asset

    return load_pretrained(tiny_asset("llama"), dtype=dtype)


TOKENS = torch.randint(0, 288, (2, 19), generator=torch.Generator().manual_seed(0))
CASES = [(s, d, e) for s in Q.CPU_SCHEMES for d in (torch.float32, torch.bfloat16) for e in (False, True)]


@pytest.mark.parametrize("scheme,dtype,embeddings", CASES)
def test_converted_model_equals_fake_quantized_and_ptq_bit_for_bit(scheme: str, dtype: torch.dtype,
                                                                   embeddings: bool) -> None:
    node = {"scheme": scheme, "group_size": 32, "embeddings": embeddings}
    model = _tiny(dtype)
    ptq = copy.deepcopy(model)
    plain = model(TOKENS)
    names = list(model.state_dict())
    Q.prepare_qat(model, node)
    assert list(model.state_dict()) == names  # checkpoints and HF exports see the same names
    with torch.no_grad():
        fake = model(TOKENS)
        Q.set_fake_quant(model, False)
        assert torch.equal(model(TOKENS), plain)  # switched off: the plain model
        Q.convert_qat(model, node)  # switches the quantizers back on first
        converted = model(TOKENS)
        Q.quantize_ptq(ptq, node)
        direct = ptq(TOKENS)
    assert not torch.equal(fake, plain)  # the rounding is there
    assert torch.equal(converted, fake)
    assert torch.equal(converted, direct)
    assert type(model.layers[0].attn.q_proj) is nn.Linear and model.layers[0].attn.q_proj.weight.__class__ \
        .__name__ == "IntxUnpackedToInt8Tensor"
    assert (type(model.tok_embeddings.weight.data) is not torch.Tensor) == embeddings


@pytest.mark.parametrize("scheme,dtype", [(s, d) for s in Q.CPU_SCHEMES for d in (torch.float32, torch.bfloat16)])
def test_lora_qat_rounds_the_merged_weight_and_converts_bit_for_bit(scheme: str, dtype: torch.dtype) -> None:
    from tunewright.modules.peft.apply import apply_lora, lora_modules, merge_lora

    model = _tiny(dtype)
    apply_lora(model, targets=["q", "v", "down"], rank=4, alpha=8)
    for _, layer in lora_modules(model):  # B = 0 would make the merged weight the base's
        nn.init.normal_(layer.lora_b.weight, std=0.05, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain_lora = model(TOKENS)
    reference = merge_lora(copy.deepcopy(model), dtype=dtype)  # what gets deployed: merged, then PTQ
    Q.quantize_ptq(reference, {"scheme": scheme})
    names = list(model.state_dict())
    q = Q.prepare_qat(model, {"scheme": scheme})
    assert list(model.state_dict()) == names  # adapters and checkpoints see the same names
    fake = model(TOKENS)
    fake.float().pow(2).mean().backward()  # through the rounding (straight-through) to A and B
    layer = model.layers[0].attn.q_proj
    assert layer.lora_a.weight.grad.abs().sum() > 0 and layer.lora_b.weight.grad.abs().sum() > 0
    assert layer.weight.grad is None  # the base stays frozen
    with torch.no_grad():
        Q.set_fake_quant(model, False)
        assert torch.equal(model(TOKENS), plain_lora)  # switched off: plain LoRA
        Q.convert_qat(model, q, dtype=dtype)
        converted = model(TOKENS)
        assert torch.equal(converted, fake.detach())
        assert torch.equal(converted, reference(TOKENS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_rounded_by_the_symmetric_per_group_int4_formula(dtype: torch.dtype) -> None:
    layer = nn.Sequential(nn.Linear(96, 8, bias=False)).to(dtype)
    w = layer[0].weight.detach().clone()
    Q.quantize_ptq(layer, {"scheme": "int4_weight_only", "group_size": 32})
    # int4 is [-8, 7]; the scale maps a group's largest |w| to 7.5 (the range's half-width),
    # computed in the weight's dtype, and q = clamp(round(w * (1 / scale)), -8, 7)
    groups = w.reshape(8, 3, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7.5
    q = torch.clamp(torch.round(groups * (1.0 / scale)), -8, 7)
    want = (q.to(dtype) * scale).reshape(8, 96)
    assert torch.equal(layer[0].weight.dequantize(), want)
    assert q.unique().numel() > 8  # most of the 16 levels are used


@pytest.mark.parametrize("scheme", Q.CPU_SCHEMES)
def test_saved_quantized_model_reloads_to_the_same_logits(tmp_path: Path, scheme: str) -> None:
    from tunewright.models import load_pretrained
    from tunewright.training.tiny_assets import tiny_asset

    model = _tiny(torch.bfloat16)
    sizes = Q.quantize_for_export(model, Q.Quantization(scheme, embeddings=True), dtype=torch.bfloat16,
                                  convert=False)
    with torch.no_grad():
        want = model(TOKENS)
    Q.save_quantized_outputs(model, Q.Quantization(scheme, embeddings=True), tmp_path,
                             source_dir=tiny_asset("llama"), dtype=torch.bfloat16, sizes=sizes)
    assert not any(p.suffix in (".pt", ".bin", ".pth") for p in (tmp_path / "quantized").iterdir())  # no pickle
    loaded = Q.load_quantized(tmp_path / "quantized", dtype="bf16")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), want)
        hf = load_pretrained(tmp_path / "dequantized", dtype=torch.bfloat16)(TOKENS)
    if scheme == "int4_weight_only":  # weight-only: the dequantized weights compute the same
        assert torch.equal(hf, want)
    else:  # the plain copy does not round its activations to int8
        assert not torch.equal(hf, want) and (hf.float() - want.float()).abs().max() < 0.5
    assert sizes["bytes_after"] < 0.7 * sizes["bytes_before"]
    with pytest.raises(ValueError, match=r"quantized in bf16, computes in it only; set dtype: bf16"):
        Q.load_quantized(tmp_path / "quantized", dtype="fp32")
    with pytest.raises(ValueError, match="not a quantized model"):
        Q.load_quantized(tmp_path / "dequantized")


# ---------------------------------------------------------------- bad inputs, one line each
@pytest.mark.parametrize("scheme", Q.CUDA_SCHEMES)
def test_gpu_only_scheme_on_cpu_is_one_line(scheme: str) -> None:
    with pytest.raises(ValueError, match=f"quantization.scheme: {scheme} runs on CUDA only.*use int8_dyn") as e:
        Q.Quantization.from_node({"scheme": scheme}).check_device("cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("node,match", [
    ({"scheme": "int3"}, r"quantization.scheme: 'int3' is not one of int8_dynamic_act_int4_weight"),
    ({"scheme": "int4_weight_only", "groupsize": 32}, "quantization.groupsize: unknown key"),
    ({"group_size": 32}, "quantization.scheme: missing"),
    ({"scheme": "int4_weight_only", "group_size": 0}, "quantization.group_size: 0"),
])
def test_bad_quantization_node_is_one_line(node: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        Q.Quantization.from_node(node)
    assert "\n" not in str(e.value)


def test_models_torchao_cannot_quantize_as_trained_are_refused_in_one_line() -> None:
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4

    node = {"scheme": "int4_weight_only"}
    with pytest.raises(ValueError, match="group_size: 48 does not divide layers.0.attn.q_proj's 128"):
        Q.prepare_qat(_tiny(torch.float32), {**node, "group_size": 48})
    lora = _tiny(torch.bfloat16)
    apply_lora(lora, targets=["q", "v"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="PTQ takes a model without LoRA adapters: merge the adapter first"):
        Q.quantize_ptq(copy.deepcopy(lora), node)
    for options in ({"dropout": 0.1}, {"use_dora": True}):
        adapted = _tiny(torch.float32)
        apply_lora(adapted, targets=["q"], rank=4, alpha=8, **options)
        with pytest.raises(ValueError, match="merged weight, which needs lora_dropout: 0, use_dora: false"):
            Q.prepare_qat(adapted, node)
    quantize_base_nf4(lora)
    with pytest.raises(ValueError, match="base is NF4 \\(QLoRA, quantize_base: true\\)"):
        Q.prepare_qat(lora, node)
    tied = _tiny(torch.float32)
    tied.output = None  # as SmolLM2 and Llama-3.2 are
    with pytest.raises(ValueError, match="quantization.embeddings: this model's output head is tied"):
        Q.prepare_qat(tied, {**node, "embeddings": True})
