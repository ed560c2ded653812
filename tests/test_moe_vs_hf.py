"""Mixtral and Qwen3-MoE against transformers through the real per-expert weight map, and our
MoE block against a per-token loop (outputs and gradients), plus the one-line errors of a
checkpoint whose experts disagree with its config.json."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.hf_reference import (TOLERANCE, assert_saved_reloads, make_hf_model, max_logit_diff,
                                random_tokens)
from tunewright.models import load_pretrained
from tunewright.modules.moe import MoE, Experts

transformers = pytest.importorskip("transformers")

MIXTRAL = {
    "top2_of_4_gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2),
    "top1_of_8_window_tied": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4,
                                  num_local_experts=8, num_experts_per_tok=1, sliding_window=12,
                                  tie_word_embeddings=True),
}
QWEN3_MOE = {
    "top2_of_4_normed_dense_first": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0]),
    "top3_of_6_unnormed_sparse_step_window": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False, decoder_sparse_step=2, use_sliding_window=True, sliding_window=10,
        attention_bias=True, tie_word_embeddings=True),
    "top1_of_8_unnormed": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=1,
        norm_topk_prob=False),
}
CASES = [("Mixtral", n) for n in MIXTRAL] + [("Qwen3Moe", n) for n in QWEN3_MOE]


def _sharpen_moe(model) -> None:
    # At HF's init (std 0.02) router probabilities are near-uniform and the experts add little
    # to the residual stream; larger weights make the routing decisive and every expert count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(10.0)
            elif ".experts." in name:
                p.mul_(10.0)


def _hf(tmp_path, kind: str, name: str):
    config = (MIXTRAL if kind == "Mixtral" else QWEN3_MOE)[name]
    model, path = make_hf_model(tmp_path, f"{kind}Config", f"{kind}ForCausalLM", **config)
    _sharpen_moe(model)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("kind,name", CASES)
def test_logits_match_transformers(tmp_path, kind, name):
    hf_model, hf_dir = _hf(tmp_path, kind, name)
    ours = load_pretrained(hf_dir)
    tokens = random_tokens(2, 40)
    assert max_logit_diff(hf_model, ours, tokens) <= TOLERANCE
    moe = [layer.mlp for layer in ours.layers if isinstance(layer.mlp, MoE)]
    assert len(moe) == len(ours.layers) - len(ours.args.dense_layers) > 0
    if moe[0].top_k > 1:  # the renormalisation option is really exercised
        for m in moe:
            m.norm_topk_prob = not m.norm_topk_prob
        assert max_logit_diff(hf_model, ours, tokens) > 10 * TOLERANCE


@pytest.mark.parametrize("kind,name", [("Mixtral", "top2_of_4_gqa"),
                                       ("Qwen3Moe", "top3_of_6_unnormed_sparse_step_window")])
def test_saved_output_reloads_in_transformers(tmp_path, kind, name):
    _, hf_dir = _hf(tmp_path, kind, name)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, f"{kind}ForCausalLM", seq=40)


def test_gradients_match_transformers(tmp_path):
    """Router and stacked-expert gradients equal transformers' (fused gate_up_proj) ones."""
    hf_model, hf_dir = _hf(tmp_path, "Qwen3Moe", "top2_of_4_normed_dense_first")
    ours = load_pretrained(hf_dir)
    tokens, targets = random_tokens(2, 24), random_tokens(2, 24, seed=5)
    for model, logits in ((hf_model, lambda t: hf_model(t).logits), (ours, ours)):
        F.cross_entropy(logits(tokens).flatten(0, 1), targets.flatten()).backward()
    hf_layer, our_layer = hf_model.model.layers[1].mlp, ours.layers[1].mlp
    gate_up = torch.cat([our_layer.experts.gate_proj.grad, our_layer.experts.up_proj.grad], dim=1)
    pairs = [(hf_layer.gate.weight.grad, our_layer.router.weight.grad),
             (hf_layer.experts.gate_up_proj.grad, gate_up),
             (hf_layer.experts.down_proj.grad, our_layer.experts.down_proj.grad)]
    for want, got in pairs:
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- the MoE block alone, against a per-token loop --------------------------------------


def _naive_moe(x, router_w, gate, up, down, top_k: int, norm: bool) -> torch.Tensor:
    """One token at a time: softmax router, top-k, weighted sum of the chosen SwiGLU experts."""
    rows = []
    for token in x:
        probs = torch.softmax(router_w @ token, dim=-1)
        weights, chosen = probs.topk(top_k)
        if norm:
            weights = weights / weights.sum()
        rows.append(sum(w * (down[e] @ (F.silu(gate[e] @ token) * (up[e] @ token)))
                        for w, e in zip(weights, chosen.tolist())))
    return torch.stack(rows)


@pytest.mark.parametrize("dim,hidden,experts,top_k,norm", [
    (16, 24, 4, 2, True),  # aligned sizes: one grouped matmul per projection
    (6, 10, 8, 1, False),  # sizes the grouped kernel cannot take: per-expert matmuls
    (12, 20, 6, 3, False),
])
def test_moe_equals_per_token_loop_with_gradients(dim, hidden, experts, top_k, norm):
    torch.manual_seed(0)
    moe = MoE(router=torch.nn.Linear(dim, experts, bias=False),
              experts=Experts(experts, dim, hidden), top_k=top_k, norm_topk_prob=norm)
    moe.experts.reset_parameters(std=0.5)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.router.weight[-1] = -moe.router.weight[:-1].sum(0) - 50  # never chosen below
    x = torch.randn(2, 13, dim).abs()  # 26 tokens: not a multiple of the kernel's alignment
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    params = [moe.router.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    upstream = torch.randn(2, 13, dim)

    got = moe(x)
    want = _naive_moe(x_ref.reshape(-1, dim), *ref_params, top_k, norm).view(2, 13, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-5)
    chosen = moe.router(x.detach().reshape(-1, dim)).topk(top_k, dim=-1).indices.unique()
    for e in range(experts):  # the gradient reaches exactly the experts the router chose
        reached = moe.experts.gate_proj.grad[e].abs().sum() > 0
        assert bool(reached) == (e in chosen.tolist())
    assert experts - 1 not in chosen.tolist()


def test_moe_backward_takes_expanded_gradients():
    """`.sum()` sends a stride-0 gradient, which the grouped-matmul backward refuses as is."""
    moe = MoE(router=torch.nn.Linear(16, 4, bias=False), experts=Experts(4, 16, 32), top_k=2)
    moe.experts.reset_parameters()
    moe(torch.randn(5, 16)).sum().backward()
    assert moe.experts.down_proj.grad is not None


# --- checkpoints whose experts disagree with config.json --------------------------------


def _edit_checkpoint(hf_dir, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _one_line_error(hf_dir) -> str:
    with pytest.raises(ValueError) as info:
        load_pretrained(hf_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_expert_index_names_the_tensor(tmp_path):
    _, hf_dir = _hf(tmp_path, "Mixtral", "top2_of_4_gqa")
    extra = "model.layers.1.block_sparse_moe.experts.4.w2.weight"
    _edit_checkpoint(hf_dir, lambda t: t.update(
        {extra: t["model.layers.1.block_sparse_moe.experts.0.w2.weight"].clone()}))
    message = _one_line_error(hf_dir)
    assert extra in message and "4 experts" in message


def test_fewer_experts_than_config_names_the_missing_tensor(tmp_path):
    _, hf_dir = _hf(tmp_path, "Mixtral", "top2_of_4_gqa")
    _edit_checkpoint(hf_dir, lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k])
    message = _one_line_error(hf_dir)
    assert "'model.layers.0.block_sparse_moe.experts.3.w1.weight'" in message
    assert "declares 4" in message


def test_config_with_fewer_experts_than_checkpoint_names_the_tensor(tmp_path):
    _, hf_dir = _hf(tmp_path, "Qwen3Moe", "top2_of_4_normed_dense_first")
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("num_local_experts", None)
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_experts": 3}))
    message = _one_line_error(hf_dir)
    assert "model.layers.1.mlp.experts.3." in message and "3 experts" in message
