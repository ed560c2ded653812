"""LoRA on mixture-of-experts experts against a naive per-token reference: each routed expert
computes W_e x + s * B_e A_e x (per expert) or W_e x + s * B A x (shared); the router stays
frozen; merging, gradients, checkpoint/resume, refusals and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.modules.moe import Experts
from tunewright.modules.peft.apply import adapter_state_dict, apply_lora, merge_lora
from tunewright.modules.peft.expert_lora import LoRAExperts
from tunewright.modules.peft.lora import LoRALinear

ARGS = ModelArgs(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=64, num_experts=4, experts_per_token=2, expert_dim=48)
PROJ = ("gate_proj", "up_proj", "down_proj")
TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def tiny(**changes) -> nn.Module:
    model = build_model(ARGS.replace(**changes), device="cpu")
    init_weights(model, seed=0)
    return model


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def naive_moe(moe: nn.Module, x: torch.Tensor, adapters: dict, scale: float) -> torch.Tensor:
    """Mixtral's routing written out token by token: softmax, top-k, renormalise, weighted sum of
    the chosen experts, each projection W_e v (+ scale * B A v with the expert's or shared A, B)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.router.weight @ x[t], dim=-1)
        weights, chosen = probs.topk(ARGS.experts_per_token)
        weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist()):
            def proj(name: str, v: torch.Tensor) -> torch.Tensor:
                y = getattr(moe.experts, name)[e] @ v
                if name in adapters:
                    A, B = adapters[name]
                    if A.dim() == 3:
                        A, B = A[e], B[e]
                    y = y + scale * (B @ (A @ v))
                return y
            h = F.silu(proj("gate_proj", x[t])) * proj("up_proj", x[t])
            out[t] += w * proj("down_proj", h)
    return out


@pytest.mark.parametrize("mode", ["per_expert", "shared"])
def test_zero_b_leaves_logits_unchanged_and_only_adapters_train(mode):
    base, adapted = tiny(), tiny()
    paths = apply_lora(adapted, targets="all-linear", rank=4, alpha=8, experts=mode)
    assert "layers.0.mlp.experts" in paths and "layers.1.mlp.experts" in paths
    with torch.no_grad():
        assert torch.equal(base(TOKENS), adapted(TOKENS))
    lora = adapted.layers[0].mlp.experts.lora
    lead = (4,) if mode == "per_expert" else ()
    assert lora.gate_proj.lora_a.shape == (*lead, 4, 32) and lora.gate_proj.lora_b.shape == (*lead, 48, 4)
    assert lora.down_proj.lora_a.shape == (*lead, 4, 48) and lora.down_proj.lora_b.shape == (*lead, 32, 4)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(adapted))
    assert "layers.0.mlp.experts.lora.up_proj.lora_b" in trainable
    assert not any("router" in n for n in trainable)


@pytest.mark.parametrize("num_tokens", [1, 24])  # 1 token: two experts get no rows
@pytest.mark.parametrize("mode,use_rslora", [("per_expert", False), ("per_expert", True), ("shared", False)])
def test_expert_lora_equals_naive_per_token_reference(mode, use_rslora, num_tokens):
    model = tiny()
    apply_lora(model, targets=["gate", "up", "down"], rank=4, alpha=8, experts=mode, use_rslora=use_rslora)
    randomize_adapters(model)
    moe = model.layers[1].mlp
    adapters = {n: (a.lora_a.detach(), a.lora_b.detach()) for n, a in moe.experts.lora.items()}
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = moe(x)
        want = naive_moe(moe, x, adapters, scale)
        assert (want - naive_moe(moe, x, {}, scale)).abs().max() > 1e-3  # the adapter matters
    assert (got - want).abs().max().item() <= 1e-5


def test_only_adapters_get_gradients_router_frozen_unless_targeted():
    model = tiny()
    apply_lora(model, targets=["q", "gate", "up", "down"], rank=4, alpha=8)
    randomize_adapters(model)  # B != 0 so A's gradient is not zero
    model(TOKENS).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".lora" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert isinstance(model.layers[0].mlp.router, nn.Linear)

    model = tiny()
    paths = apply_lora(model, targets=["router"], rank=2, alpha=4)
    assert paths == ["layers.0.mlp.router", "layers.1.mlp.router"]
    assert isinstance(model.layers[0].mlp.router, LoRALinear)
    assert not isinstance(model.layers[0].mlp.experts, LoRAExperts)


@pytest.mark.parametrize("mode", ["per_expert", "shared"])
def test_merged_weights_give_the_adapted_logits(mode):
    model = tiny()
    apply_lora(model, targets=["q", "router", "gate", "up", "down"], rank=4, alpha=8, experts=mode,
               use_rslora=mode == "shared")
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        merge_lora(model)
        merged = model(TOKENS)
    assert type(model.layers[0].mlp.experts) is Experts
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
    assert (adapted - merged).abs().max().item() < 1e-5
    assert (adapted - tiny()(TOKENS)).abs().max().item() > 1e-3  # the adapters matter


def test_mixed_dense_and_moe_layers_and_frozen_experts():
    model = tiny(dense_layers=(0,))
    paths = apply_lora(model, targets=["gate", "down"], rank=2, alpha=4)
    assert paths == ["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj", "layers.1.mlp.experts"]
    assert list(model.layers[1].mlp.experts.lora) == ["gate_proj", "down_proj"]
    model = tiny(dense_layers=(0,))
    paths = apply_lora(model, targets=["gate", "down"], rank=2, alpha=4, experts=None)
    assert paths == ["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"]


def test_expert_adapters_checkpoint_and_resume(tmp_path):
    from tunewright.training.checkpointing import load_checkpoint, save_checkpoint
    from tunewright.training.state import TrainState

    def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = tiny()
        apply_lora(model, targets=["gate", "up", "down"], rank=4, alpha=8)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        F.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    model, opt = setup()
    step(model, opt)
    ckpt = save_checkpoint(tmp_path, 1, TrainState(model=model, optimizer=opt), run_state={"step": 1})
    step(model, opt)
    resumed, opt2 = setup()
    load_checkpoint(ckpt, TrainState(model=resumed, optimizer=opt2))
    step(resumed, opt2)
    want, got = adapter_state_dict(model), adapter_state_dict(resumed)
    assert any(".experts.lora." in k for k in want) and set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_few_steps_lower_the_loss():
    model = tiny()
    apply_lora(model, targets=["gate", "up", "down"], rank=4, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_unsupported_combinations_fail_in_one_line():
    with pytest.raises(ValueError, match="DoRA on mixture-of-experts experts is not supported"):
        apply_lora(tiny(), targets=["up"], use_dora=True)
    apply_lora(tiny(), targets=["q", "up"], use_dora=True, experts=None)  # DoRA elsewhere is fine
    with pytest.raises(ValueError, match="lora experts 'all' does not exist; choose from per_expert, shared"):
        apply_lora(tiny(), targets=["up"], experts="all")
    with pytest.raises(ValueError, match="lora target 'router': this model has no mixture-of-experts layer"):
        apply_lora(tiny(num_experts=0, experts_per_token=0), targets=["router"])


def test_qlora_on_stacked_experts_is_refused():
    pytest.importorskip("torchao")
    from tunewright.modules.peft.nf4 import nf4_module
    from tunewright.modules.peft.qlora import quantize_base_nf4

    with pytest.raises(AssertionError):  # torchao's NF4 tensor itself: 2-D only
        nf4_module().to_nf4(torch.randn(4, 48, 32), 64, 4)
    model = tiny()
    apply_lora(model, targets=["q", "up"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="NF4 tensor holds only 2-D weights, not the stacked experts "
                                         "of layers.0.mlp.experts; set experts=None"):
        quantize_base_nf4(model)
    model = tiny()
    apply_lora(model, targets=["q", "up"], rank=4, alpha=8, experts=None)
    assert quantize_base_nf4(model) == 2
