"""Tensor parallel vs one process, launched by tests/test_tensor_parallel.py under torchrun.

    torchrun --nproc_per_node 2 tp_equivalence.py --out RESULT.json [--dp 1] [--cases a,b]

Every rank builds the same seeded tiny decoder, keeps one copy whole as the reference (run in
this process, on the whole batch) and shards the other over a ("dp", "tp") mesh with tp = world
/ dp. Each case records, as the max over ranks, the largest |difference| of logits, of the loss
of every gradient (DTensor gradients gathered with full_tensor) and of every parameter after one
clipped AdamW step. Rank 0 writes them to --out; the test asserts. With --dp > 1 only the FSDP
cases run (their gradients are summed over dp; the others' would not be).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from tunewright.models.args import ModelArgs
from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.modules.peft.apply import apply_lora, lora_modules
from tunewright.training.tensor_parallel import apply_tensor_parallel
from tunewright.training.objectives import causal_lm_loss

LLAMA = ModelArgs(family="llama", vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_dim=128)
# Qwen3's parts (per-head q/k norms) with q/k/v biases and a tied head.
QWEN3 = ModelArgs(family="qwen3", vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_dim=128, head_dim=16, qk_norm=True, attn_bias=True, tie_embeddings=True)
# Gemma-2's parts: attention and logit soft-caps, a sliding layer, sandwich norms, scaled embeddings.
GEMMA2 = ModelArgs(family="gemma2", vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_dim=128, head_dim=16, tie_embeddings=True, sliding_window=4,
                   layer_types=("sliding_attention", "full_attention"), attn_scale=0.25, attn_softcap=50.0,
                   activation="gelu_pytorch_tanh", norm_offset=1.0, sandwich_norms=True, embed_scale=8.0,
                   final_softcap=30.0)
MHA = LLAMA.replace(num_kv_heads=4, attn_bias=True, mlp_bias=True)
# Gemma's multi-query attention: one kv head, which every rank keeps whole.
GEMMA_MQA = ModelArgs(family="gemma", vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
                      intermediate_dim=128, head_dim=16, tie_embeddings=True, activation="gelu_pytorch_tanh",
                      norm_offset=1.0, embed_scale=8.0)


def build(args: ModelArgs, adapt: Callable[[nn.Module], None] | None = None) -> nn.Module:
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    if adapt is not None:
        adapt(model)
    return model


def lora(model: nn.Module, targets: list[str] | None = None, **kw: Any) -> None:
    torch.manual_seed(1)
    if targets is None:
        targets = ["q", "k", "v", "o", "gate", "up", "down"] + ([] if model.args.tie_embeddings else ["output"])
    apply_lora(model, targets=targets, rank=4, alpha=8.0, **kw)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at init would leave lora_a without a gradient to compare
        for _, m in lora_modules(model):
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=gen) * 0.1)


CASES: dict[str, tuple[ModelArgs, Callable[[nn.Module], None] | None]] = {
    "llama_gqa": (LLAMA, None),
    "mha_biases": (MHA, None),
    "gemma_mqa": (GEMMA_MQA, None),
    "gemma_mqa_lora": (GEMMA_MQA, lambda m: lora(m, targets=["k", "v", "o"])),
    "qwen3_qk_norm_bias_tied": (QWEN3, None),
    "gemma2_softcap_window": (GEMMA2, None),
    "llama_lora": (LLAMA, lora),
    "qwen3_dora": (QWEN3, lambda m: lora(m, use_dora=True)),
    "llama_fsdp": (LLAMA, None),  # the recipes' order: TP -> activation checkpointing -> FSDP2
    "qwen3_lora_fsdp": (QWEN3, lora),
    "llama_meta_load": (LLAMA, None),  # the recipe's way: meta -> TP -> to_empty -> load
}


def batch(dp_rank: int, dp: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The whole batch (4 rows) and this dp rank's rows of it."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (4, 12), generator=gen)
    labels = torch.randint(0, 64, (4, 12), generator=gen)
    labels[:, :3] = -100  # a prompt that carries no loss
    full = {"tokens": tokens, "labels": labels}
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
    return full, {k: v[rows] for k, v in full.items()}


def step(model: nn.Module, b: dict[str, torch.Tensor], num_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits by forward, and the training loss through the trainer's loss (fused head + CE);
    backward through both so the head's plain path gets gradients too."""
    logits = model(b["tokens"])
    loss_sum, _ = causal_lm_loss(model, b)
    loss = loss_sum / num_targets
    (loss + 1e-2 * logits.float().square().sum() / num_targets).backward()
    return logits.detach(), loss.detach()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(name: str, mesh: DeviceMesh) -> dict[str, float]:
    args, adapt = CASES[name]
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    whole, mine = batch(dp_rank, dp)
    num_targets = int((whole["labels"] != -100).sum())

    ref = build(args, adapt)
    if name.endswith("meta_load"):
        model = build_model(args, device="meta")
    else:
        model = copy.deepcopy(ref)
    apply_tensor_parallel(model, mesh["tp"])
    fsdp = name.endswith("fsdp")
    if fsdp:  # the distributed recipes' FSDP2 (gradients summed over dp, as the loss is global)
        from tunewright.training.parallel import shard_fsdp2
        from tunewright.training.transforms import apply_activation_checkpointing

        if name == "llama_fsdp":
            apply_activation_checkpointing(model)
        shard_fsdp2(model, mesh["dp"])
    if name.endswith("meta_load"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device="cpu")
        set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True))

    ref_logits, ref_loss = step(ref, whole, num_targets)
    logits, loss = step(model, mine, num_targets)
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
    # The loss of this rank's rows, summed over dp, is the whole batch's loss.
    loss_all = loss.clone()
    dist.all_reduce(loss_all, group=mesh["dp"].get_group())
    out = {
        "logits": (logits - ref_logits[rows]).abs().max().item(),
        "loss": (loss_all - ref_loss).abs().item(),
        "local_heads": float(model.layers[0].attn.num_heads),
    }
    ref_params = dict(ref.named_parameters())
    grad_diff, missing = 0.0, []
    for pname, p in model.named_parameters():
        r = ref_params[pname]
        if (p.grad is None) != (r.grad is None):
            missing.append(pname)
        elif p.grad is not None:
            grad_diff = max(grad_diff, (full(p.grad) - r.grad).abs().max().item())
    assert not missing, f"{name}: gradient present on one side only: {missing}"
    out["grads"] = grad_diff
    # Each gradient in its parameter's layout (a replicated weight's partial sums already summed).
    out["grads_off_layout"] = float(sum(
        isinstance(p.grad, DTensor) and p.grad.placements != p.placements for p in model.parameters()
    ))
    out["num_sharded"] = float(sum(isinstance(p, DTensor) for p in model.parameters()))
    out["num_params"] = float(len(ref_params))
    out.update(optimizer_step(model, ref))
    return out


def optimizer_step(model: nn.Module, ref: nn.Module) -> dict[str, float]:
    """One clipped AdamW step on both: every parameter of the sharded model must lie on one mesh
    (tp, or (dp, tp) after FSDP) for clip_grad_norm_ and the foreach kernels, and must move as
    the reference's."""
    norms = []
    for m in (ref, model):
        params = [p for p in m.parameters() if p.requires_grad]
        # eps well above float noise: at the default 1e-8 a gradient that is ~0 (an unused
        # embedding row's cancellations) steps by +-lr on its noise alone, in either run.
        opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-3, weight_decay=0.1)
        norms.append(full(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        opt.step()
    ref_params = dict(ref.named_parameters())
    diff = max((full(p.detach()) - ref_params[n].detach()).abs().max().item() for n, p in model.named_parameters())
    return {"grad_norm": (norms[0] - norms[1]).abs().item(), "params_after_step": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (opts.dp, world // opts.dp), mesh_dim_names=("dp", "tp"))
    results: dict[str, Any] = {}
    names = opts.cases.split(",")
    assert opts.dp == 1 or all(n.endswith("fsdp") for n in names), "--dp > 1 needs FSDP cases"
    for name in names:
        start = time.perf_counter()
        res = run_case(name, mesh)
        res["seconds"] = time.perf_counter() - start
        for key, value in res.items():  # the worst rank's figure
            t = torch.tensor(value, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res[key] = t.item()
        results[name] = res
        if dist.get_rank() == 0:
            print(name, res, flush=True)
    results["refusal"] = refusal(mesh)
    if dist.get_rank() == 0:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def refusal(mesh: DeviceMesh) -> str:
    """The error a real 2-way mesh gives for 3 kv heads (the single-process tests cover the rest)."""
    model = build(LLAMA.replace(num_heads=6, num_kv_heads=3, head_dim=16))
    try:
        apply_tensor_parallel(model, mesh["tp"])
    except ValueError as e:
        return str(e)
    return ""


if __name__ == "__main__":
    main()
