"""`apply_lora(model, ...)`: swap chosen linear layers of a built decoder for `LoRALinear`.

Targets are named by role, the same for every family: q, k, v, o (attention), gate, up, down
(MLP), output (the head), router (a mixture-of-experts layer's router, never adapted unless
named). Hugging Face names (q_proj, ..., lm_head) are accepted too. Everything that is not an
adapter is frozen. In a mixture-of-experts layer gate/up/down adapt the stacked experts
(`expert_lora.py`), one adapter per expert or one shared by all, as `experts=` says.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from tunewright.modules.moe import MoE
from tunewright.modules.peft.expert_lora import EXPERT_MODES, LoRAExperts
from tunewright.modules.peft.lora import LoRALinear

# role -> attribute path inside a decoder block ("output" is the model's head)
TARGETS: dict[str, str] = {
    "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "output": "output",
    "router": "mlp.router",
}
EXPERT_ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # role -> Experts param
ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "output_proj": "o",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "lm_head": "output",
           "w1": "gate", "w3": "up", "w2": "down"}
ALL_LINEAR = ["q", "k", "v", "o", "gate", "up", "down"]


def normalize_targets(targets: Sequence[str] | str) -> list[str]:
    if isinstance(targets, str):
        targets = ALL_LINEAR if targets in ("all", "all-linear", "all_linear") else [targets]
    roles = []
    for t in targets:
        role = ALIASES.get(t, t)
        if role not in TARGETS:
            raise ValueError(f"lora target '{t}' does not exist; choose from "
                             f"{', '.join(TARGETS)} (or 'all-linear')")
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ValueError("lora targets: name at least one of " + ", ".join(TARGETS))
    return roles


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: nn.Module | None = root
    for part in path.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _is_moe(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "mlp", None), MoE)


def target_paths(model: nn.Module, roles: Iterable[str]) -> Iterator[str]:
    """Linear-layer paths (`layers.3.attn.q_proj`, `output`) for the given roles; the MLP roles
    of a mixture-of-experts layer are its stacked experts, which `apply_lora` adapts apart, and
    the linear layers of its shared expert, if it has one (Llama 4)."""
    for role in roles:
        if role == "output":
            yield "output"
            continue
        for i, layer in enumerate(model.layers):
            if role in EXPERT_ROLES and _is_moe(layer) and layer.mlp.shared_expert is not None:
                yield f"layers.{i}.mlp.shared_expert.{EXPERT_ROLES[role]}"
            if (role in EXPERT_ROLES and _is_moe(layer)) or (role == "router" and not _is_moe(layer)):
                continue
            yield f"layers.{i}.{TARGETS[role]}"


def apply_lora(
    model: nn.Module,
    *,
    targets: Sequence[str] | str,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    experts: str | None = "per_expert",
) -> list[str]:
    """Freeze `model` and put adapters on `targets`; returns the adapted module paths.

    `experts`: how gate/up/down adapt a mixture-of-experts layer: "per_expert" (an adapter per
    expert), "shared" (one adapter added to every expert) or None (experts stay frozen).
    """
    roles = normalize_targets(targets)
    if experts is not None and experts not in EXPERT_MODES:
        raise ValueError(f"lora experts '{experts}' does not exist; choose from "
                         f"{', '.join(EXPERT_MODES)} or None")
    moe_layers = [i for i, layer in enumerate(model.layers) if _is_moe(layer)]
    if "router" in roles and not moe_layers:
        raise ValueError("lora target 'router': this model has no mixture-of-experts layer")
    expert_params = [EXPERT_ROLES[r] for r in roles if r in EXPERT_ROLES]
    if use_dora and experts and expert_params and moe_layers:
        raise ValueError("DoRA on mixture-of-experts experts is not supported: set use_dora=False, "
                         "or experts=None (recipe key lora_experts: null) to leave the experts frozen")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for path in target_paths(model, roles):
        module = _get(model, path)
        if path == "output" and module is None:
            raise ValueError("lora target 'output': this model's head is tied to the embeddings, "
                             "so it has no separate output layer to adapt")
        if isinstance(module, LoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"lora target '{path}' is a {type(module).__name__}, not a linear layer")
        _set(model, path, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout,
                                     use_rslora=use_rslora, use_dora=use_dora))
        adapted.append(path)
    if experts and expert_params:
        for i in moe_layers:
            moe = model.layers[i].mlp
            if isinstance(moe.experts, LoRAExperts):
                continue
            moe.experts = LoRAExperts(moe.experts, projections=expert_params, rank=rank, alpha=alpha,
                                      mode=experts, dropout=dropout, use_rslora=use_rslora)
            adapted.append(f"layers.{i}.mlp.experts")
    model.lora_config = {"targets": roles, "rank": rank, "alpha": alpha, "dropout": dropout,
                         "use_rslora": use_rslora, "use_dora": use_dora, "experts": experts}
    return adapted


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def expert_lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRAExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRAExperts):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by our names (`layers.0.attn.q_proj.lora_a.weight`,
    `layers.0.mlp.experts.lora.gate_proj.lora_a`, ...)."""
    out = {}
    for name, module in expert_lora_modules(model):
        out.update({f"{name}.lora.{k}": v for k, v in module.lora.named_parameters()})
    for name, module in lora_modules(model):
        out[f"{name}.lora_a.weight"] = module.lora_a.weight
        out[f"{name}.lora_b.weight"] = module.lora_b.weight
        if module.magnitude is not None:
            out[f"{name}.magnitude"] = module.magnitude
    return {k: v.detach() for k, v in out.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapted layer by a plain `nn.Linear` (adapted experts by a plain `Experts`)
    holding the merged weight, in place."""
    for name, module in list(expert_lora_modules(model)):
        _set(model, name, module.merged(dtype))
    for name, module in list(lora_modules(model)):
        w = module.merged_weight()
        target_dtype = dtype or (module.lora_a.weight.dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=target_dtype)
        linear.weight.copy_(w.to(target_dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(target_dtype))
        _set(model, name, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes as its base model: every LoRA/DoRA layer and expert
    adapter is skipped. With LoRA this is the reference (or teacher-free KL anchor) of DPO, GRPO
    and friends at no memory cost: the frozen base is already there.

        with torch.no_grad(), adapters_disabled(policy):
            ref_logps, _ = sequence_logprobs(policy, batch)
    """
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    if not modules:
        raise ValueError("adapters_disabled: the model has no adapters (a full fine-tune needs a "
                         "separate reference model)")
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.disabled = was
