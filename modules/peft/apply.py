"""`apply_lora(model, ...)`: swap chosen linear layers of a built decoder for `LoRALinear`.

Targets are named by role, the same for every family: q, k, v, o (attention), gate, up, down
(MLP), output (the head). Hugging Face names (q_proj, ..., lm_head) are accepted too. Everything
that is not an adapter is frozen.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from tunewright.modules.peft.lora import LoRALinear

# role -> attribute path inside a decoder block ("output" is the model's head)
TARGETS: dict[str, str] = {
    "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "output": "output",
}
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


def target_paths(model: nn.Module, roles: Iterable[str]) -> Iterator[str]:
    """Module paths (`layers.3.attn.q_proj`, `output`) for the given roles."""
    for role in roles:
        if role == "output":
            yield "output"
            continue
        for i in range(len(model.layers)):
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
) -> list[str]:
    """Freeze `model` and put adapters on `targets`; returns the adapted module paths."""
    roles = normalize_targets(targets)
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
    model.lora_config = {"targets": roles, "rank": rank, "alpha": alpha, "dropout": dropout,
                         "use_rslora": use_rslora, "use_dora": use_dora}
    return adapted


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by our names (`layers.0.attn.q_proj.lora_a.weight`, ...)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{name}.lora_a.weight"] = module.lora_a.weight
        out[f"{name}.lora_b.weight"] = module.lora_b.weight
        if module.magnitude is not None:
            out[f"{name}.magnitude"] = module.magnitude
    return {k: v.detach() for k, v in out.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapted layer by a plain `nn.Linear` holding the merged weight, in place."""
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
