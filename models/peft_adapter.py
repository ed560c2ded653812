"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Tensor names are PEFT's for the Hugging Face model (`base_model.model.<hf module>.lora_A.weight`,
`lora_B.weight`, `lora_magnitude_vector` for DoRA), derived from the family's weight map, so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads what we save and we load what
PEFT saves.

Fused checkpoints (Phi-3's `qkv_proj`, `gate_up_proj`): PEFT adapts the fused layer with one A
and one B, we adapt its parts (q, k, v) apart. Saving stacks the parts' A ([n r, in]) and puts
their B on a block diagonal ([sum out, n r]): the fused B A is then each part's B A on its own
rows, exactly, and `rank_pattern`/`alpha_pattern` give that layer rank n r with our scale.
Loading splits B by rows: a block-diagonal B goes back into rank-r parts; any other B (trained
by PEFT) is still exact when each part keeps the whole A and its rows of B (rank R per part).
DoRA is exact both ways, since its norm is taken per output row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunewright.data.files import read_json
from tunewright.models.pretrained import check_finite, read_safetensors
from tunewright.models.registry import get_family
from tunewright.models.score import HF_SCORE
from tunewright.models.weight_map import WeightMap
from tunewright.modules.peft.apply import TARGETS, apply_lora, expert_lora_modules, lora_modules, target_paths
from tunewright.modules.peft.lora import LoRALinear
from tunewright.training.atomic import OutputKind, output_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# A directory with adapter_config.json; re-saving into one replaces the adapter's two files.
PEFT_ADAPTER = OutputKind("a PEFT adapter", lambda d: (d / ADAPTER_CONFIG).is_file())


def _weight_map(model: nn.Module) -> WeightMap:
    return get_family(model.args.family).weight_map


def _role(path: str) -> str | None:
    """`layers.3.attn.q_proj` -> `q`; None for a layer that is no LoRA target."""
    return next((role for role, sub in TARGETS.items() if path == sub or path.endswith(f".{sub}")), None)


def _hf_group(model: nn.Module, path: str) -> tuple[str, tuple[str, ...]]:
    """The HF module holding our linear layer `path`, and all our layers fused into it (just
    `path` unless the checkpoint fuses it), in HF row order."""
    weights = _weight_map(model)
    if hf := weights.to_hf(f"{path}.weight"):
        return hf.removesuffix(".weight"), (path,)
    if fused := weights.fused_group(f"{path}.weight"):
        hf, parts = fused
        return hf.removesuffix(".weight"), tuple(p.removesuffix(".weight") for p in parts)
    raise ValueError(f"module '{path}' has no Hugging Face name in family {model.args.family}")


def adapter_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """HF module -> our adapted layers it covers, for every adapted layer of `model`."""
    for name, _ in expert_lora_modules(model):
        raise ValueError(f"{name}: LoRA on mixture-of-experts experts has no PEFT adapter format "
                         f"yet; merge it (save_final_model=true) or adapt without experts")
    groups: dict[str, tuple[str, ...]] = {}
    for name, _ in lora_modules(model):
        hf, parts = _hf_group(model, name)
        if not all(isinstance(model.get_submodule(p), LoRALinear) for p in parts):
            roles = ", ".join(_role(p) for p in parts)
            raise ValueError(f"lora targets: adapt {roles} together in a {model.args.family} model: its "
                             f"checkpoint fuses them into one layer ({hf.rsplit('.', 1)[-1]}) that PEFT "
                             f"adapts as a whole")
        groups[hf] = parts
    return groups


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for hf, parts in adapter_groups(model).items():
        mods: list[LoRALinear] = [model.get_submodule(p) for p in parts]
        key = f"{PREFIX}{hf}"
        out[f"{key}.lora_A.weight"] = torch.cat([m.lora_a.weight for m in mods])
        out[f"{key}.lora_B.weight"] = torch.block_diag(*[m.lora_b.weight for m in mods])
        if mods[0].magnitude is not None:
            out[f"{key}.lora_magnitude_vector"] = torch.cat([m.magnitude for m in mods])
    if model.args.num_labels is not None:  # a score head trains whole: PEFT's modules_to_save
        out[f"{PREFIX}{HF_SCORE}"] = model.output.weight
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def peft_config(model: nn.Module, base_model_path: str | None) -> dict[str, Any]:
    cfg = model.lora_config
    groups = adapter_groups(model)
    fused = {hf.rsplit(".", 1)[-1]: len(parts) for hf, parts in groups.items() if len(parts) > 1}
    # A fused layer has rank n r; its alpha grows so that PEFT's scale (alpha / r, or
    # alpha / sqrt(r) with rslora) stays ours.
    grow = math.sqrt if cfg["use_rslora"] else float
    score = model.args.num_labels is not None  # PEFT's sequence-classification adapter
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if score else "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "use_rslora": cfg["use_rslora"], "use_dora": cfg["use_dora"],
        "target_modules": sorted({hf.rsplit(".", 1)[-1] for hf in groups}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": [HF_SCORE.removesuffix(".weight")] if score else None, "layers_to_transform": None,
        "rank_pattern": {name: n * cfg["rank"] for name, n in fused.items()},
        "alpha_pattern": {name: cfg["alpha"] * grow(n) for name, n in fused.items()},
    }


def write_peft_adapter(model: nn.Module, directory: Path, *, base_model_path: str | None = None) -> None:
    """Write the adapter files into an existing directory (e.g. a checkpoint being written)."""
    from safetensors.torch import save_file

    config = peft_config(model, base_model_path)  # first: refuses an unexportable model early
    save_file(peft_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_path: str | None = None,
                      overwrite: bool = False) -> Path:
    """The adapter as its own directory, atomic; `out_dir` must be absent, empty or a PEFT
    adapter directory, unless `overwrite` (training/atomic.py's `output_dir`)."""
    with output_dir(out_dir, PEFT_ADAPTER, overwrite=overwrite) as tmp:
        write_peft_adapter(model, tmp, base_model_path=base_model_path)
    return Path(out_dir)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')} is not supported (only LORA)")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, kind) or value <= 0):
            raise ValueError(f"{path}: '{key}' must be a positive number, got {value!r}")
    if "lora_alpha" not in cfg:
        raise ValueError(f"{path}: lacks 'lora_alpha' (the adapter's scale is lora_alpha / r)")
    return cfg


@dataclass
class _Part:
    """What one of our LoRA layers receives from a PEFT module."""

    path: str
    lora_a: torch.Tensor  # [rank, in]
    lora_b: torch.Tensor  # [out, rank]
    magnitude: torch.Tensor | None
    alpha: float  # with lora_a's rank, gives PEFT's scale


def _peft_pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():  # PEFT's own matching rule (get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _block_rank(b_rows: list[torch.Tensor], rank: int) -> int | None:
    """r when the rows of part j use only columns j r .. (j+1) r of B (B block-diagonal)."""
    n = len(b_rows)
    if rank % n:
        return None
    r = rank // n
    for j, rows in enumerate(b_rows):
        if rows[:, : j * r].any() or rows[:, (j + 1) * r:].any():
            return None
    return r


def _split(model: nn.Module, hf: str, parts: tuple[str, ...], tensors: dict[str, torch.Tensor],
           cfg: dict[str, Any], source: Path, *, compact: bool) -> list[_Part]:
    key = f"{PREFIX}{hf}"
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    mag = tensors.get(f"{key}.lora_magnitude_vector")
    alpha = float(_peft_pattern(cfg.get("alpha_pattern"), hf, cfg["lora_alpha"]))
    in_dim = model.get_submodule(parts[0]).in_features
    if a.shape[1] != in_dim:
        raise ValueError(f"{source}: adapter does not match the base model: '{key}.lora_A.weight' has shape "
                         f"{tuple(a.shape)}, the model needs {(a.shape[0], in_dim)}")
    if len(parts) == 1:
        return [_Part(parts[0], a, b, mag, alpha)]
    sizes = [model.get_submodule(p).out_features for p in parts]
    if b.shape[0] != sum(sizes):
        raise ValueError(f"{source}: adapter does not match the base model: '{key}.lora_B.weight' has shape "
                         f"{tuple(b.shape)}, the model needs {(sum(sizes), b.shape[1])}")
    b_rows = list(b.split(sizes))
    mags = list(mag.split(sizes)) if mag is not None else [None] * len(parts)
    r = _block_rank(b_rows, a.shape[0]) if compact else None
    if r is None:  # the whole A in every part: B_j A is the fused update's rows, exactly
        return [_Part(p, a, rows, m, alpha) for p, rows, m in zip(parts, b_rows, mags)]
    # Same scale at rank r: alpha / n (LoRA) or alpha / sqrt(n) (rslora).
    shrink = math.sqrt(len(parts)) if cfg.get("use_rslora") else len(parts)
    return [_Part(p, a[j * r:(j + 1) * r], rows[:, j * r:(j + 1) * r], m, alpha / shrink)
            for j, (p, rows, m) in enumerate(zip(parts, b_rows, mags))]


def _plan(model: nn.Module, groups: dict[str, tuple[str, ...]], tensors: dict[str, torch.Tensor],
          cfg: dict[str, Any], source: Path) -> list[_Part]:
    """One rank and scale for every layer (our apply_lora has one), compact where B allows."""
    for compact in (True, False):
        plan = [p for hf, parts in groups.items()
                for p in _split(model, hf, parts, tensors, cfg, source, compact=compact)]
        ranks = {p.lora_a.shape[0] for p in plan}
        if len(ranks) == 1 and all(math.isclose(p.alpha, plan[0].alpha, rel_tol=1e-9) for p in plan):
            return plan
    kinds = {(p.lora_a.shape[0], p.alpha): p.path for p in plan}
    raise ValueError(f"{source.parent / ADAPTER_CONFIG}: layers with different ranks or alphas "
                     f"(rank_pattern/alpha_pattern) are not supported: "
                     + ", ".join(f"{path} rank {r} alpha {a:g}" for (r, a), path in kinds.items()))


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapter saved in `adapter_dir` (by us or by PEFT) to `model`, in place."""
    cfg = read_adapter_config(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    tensors = read_safetensors(weights_path)
    for name, tensor in tensors.items():
        check_finite(tensor, name, weights_path)
    # PEFT may save with the adapter name inside the key (".default."); drop it.
    tensors = {k.replace(".default.", ".").replace(".default", ""): v for k, v in tensors.items()}
    score = tensors.pop(f"{PREFIX}{HF_SCORE}", None)  # a sequence-classification adapter's head
    if score is not None and (model.args.num_labels is None or score.shape != model.output.weight.shape):
        raise ValueError(f"{weights_path}: adapter does not match the base model: its score head has shape "
                         f"{tuple(score.shape)}, the model has "
                         + ("no score head (load it with num_labels)" if model.args.num_labels is None
                            else f"{tuple(model.output.weight.shape)}"))
    use_dora = bool(cfg.get("use_dora", False))

    # Which of our roles the adapter covers, from its tensors (whatever target_modules says).
    roles: list[str] = []
    for key in tensors:
        module = key.removeprefix(PREFIX).split(".lora_", 1)[0]
        place = _weight_map(model).place(f"{module}.weight")
        ours = place.ours if place is not None and place.expert is None else ("",)
        found = [_role(p.removesuffix(".weight")) for p in ours]
        if None in found:
            raise ValueError(f"{weights_path}: adapter does not match the base model: it has '{key}', "
                             f"which this model lacks")
        roles += [r for r in found if r not in roles]
    groups = dict(_hf_group(model, path) for path in target_paths(model, roles))
    leaves = ("lora_A.weight", "lora_B.weight", *(["lora_magnitude_vector"] if use_dora else []))
    expected = {f"{PREFIX}{hf}.{leaf}" for hf in groups for leaf in leaves}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which this model lacks"
        raise ValueError(f"{weights_path}: adapter does not match the base model: it {what}")

    plan = _plan(model, groups, tensors, cfg, weights_path)
    rank = plan[0].lora_a.shape[0]
    alpha = cfg["lora_alpha"] if math.isclose(plan[0].alpha, cfg["lora_alpha"], rel_tol=1e-9) else plan[0].alpha
    apply_lora(model, targets=roles, rank=rank, alpha=alpha, dropout=0.0,
               use_rslora=cfg.get("use_rslora", False), use_dora=use_dora)
    with torch.no_grad():
        for part in plan:
            module: LoRALinear = model.get_submodule(part.path)
            hf = _hf_group(model, part.path)[0]
            pairs = [("lora_A.weight", module.lora_a.weight, part.lora_a),
                     ("lora_B.weight", module.lora_b.weight, part.lora_b)]
            if module.magnitude is not None:
                pairs.append(("lora_magnitude_vector", module.magnitude, part.magnitude))
            for leaf, param, t in pairs:
                if t.shape != param.shape:
                    raise ValueError(f"{weights_path}: adapter does not match the base model: "
                                     f"'{PREFIX}{hf}.{leaf}' has shape {tuple(t.shape)}, the model "
                                     f"needs {tuple(param.shape)}")
                param.copy_(t.to(param.dtype))
        if score is not None:
            model.output.weight.copy_(score.to(model.output.weight.dtype))
    return model
