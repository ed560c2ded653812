"""Adapters against their definitions: LoRA/RSLoRA/DoRA formulas, merging, QLoRA, PEFT interop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.modules.peft.apply import adapter_state_dict, apply_lora, merge_lora
from tunewright.modules.peft.lora import LoRALinear

ARGS = ModelArgs(family="llama", vocab_size=96, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=128)


def tiny(tie: bool = False) -> nn.Module:
    model = build_model(ARGS.replace(tie_embeddings=tie), device="cpu")
    init_weights(model, seed=0)
    return model


def randomize_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in adapter_state_dict(model).items():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("magnitude") else 0.0))


TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_with_zero_b_leaves_logits_unchanged():
    base = tiny()
    adapted = tiny()
    apply_lora(adapted, targets="all-linear", rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(base(TOKENS), adapted(TOKENS))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_merged_weights_give_the_adapted_logits(kind):
    model = tiny()
    apply_lora(model, targets=["q", "v", "down"], rank=4, alpha=8,
               use_rslora=kind == "rslora", use_dora=kind == "dora")
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        merge_lora(model)
        merged = model(TOKENS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (adapted - merged).abs().max().item() < 1e-5


def fixed_layer(**kw) -> tuple[LoRALinear, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = nn.Linear(6, 5)
    W, b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    A, B = torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    layer = LoRALinear(base, rank=3, alpha=6.0, **kw)
    with torch.no_grad():
        layer.lora_a.weight.copy_(A)
        layer.lora_b.weight.copy_(B)
    return layer, W, b, A, B


def test_lora_and_rslora_scales_match_the_papers():
    x = torch.randn(4, 6)
    for use_rslora, scale in ((False, 6.0 / 3), (True, 6.0 / math.sqrt(3))):
        layer, W, b, A, B = fixed_layer(use_rslora=use_rslora)
        want = x @ W.T + b + scale * (x @ A.T @ B.T)
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_dora_matches_the_paper():
    """DoRA: W' = m * (W + s BA) / ||W + s BA||_c with the norm per output row (paper eq. 5)."""
    layer, W, b, A, B = fixed_layer(use_dora=True)
    assert torch.allclose(layer.magnitude, W.norm(dim=1))  # m starts at ||W||
    m = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])
    with torch.no_grad():
        layer.magnitude.copy_(m)
    x = torch.randn(4, 6)
    V = W + 2.0 * (B @ A)
    want = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_unknown_or_tied_targets_fail_in_one_line():
    with pytest.raises(ValueError, match="lora target 'qkv' does not exist; choose from q, k, v"):
        apply_lora(tiny(), targets=["qkv"])
    with pytest.raises(ValueError, match="tied to the embeddings"):
        apply_lora(tiny(tie=True), targets=["q", "output"])


def test_qlora_base_is_nf4_within_error_and_trains():
    pytest.importorskip("torchao")
    from tunewright.modules.peft.nf4 import is_nf4
    from tunewright.modules.peft.qlora import quantize_base_nf4
    from tunewright.modules.loss import chunked_cross_entropy

    model = tiny()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, targets="all-linear", rank=8, alpha=16)
    assert quantize_base_nf4(model) == 14
    q = model.layers[0].attn.q_proj
    assert is_nf4(q.weight)
    w = dense["layers.0.attn.q_proj.weight"]
    err = (q.base_weight() - w).abs()
    # NF4: 16 levels over [-absmax, absmax] per block of 64; the widest gap is ~0.28 * absmax.
    assert err.max() <= 0.16 * w.abs().max() and err.mean() < 0.05 * w.abs().max()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = TOKENS[:1]
    labels = torch.cat([tokens[:, 1:], torch.full((1, 1), -100)], dim=1)
    losses = []
    for _ in range(8):
        total, n = chunked_cross_entropy(model(tokens, hidden_only=True), labels, model.head)
        (total / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append((total / n).item())
    assert losses[-1] < losses[0] - 0.5
