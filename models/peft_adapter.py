"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Tensor names are PEFT's for the Hugging Face model (`base_model.model.<hf module>.lora_A.weight`,
`lora_B.weight`, `lora_magnitude_vector` for DoRA), derived from the family's weight map, so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads what we save and we load what
PEFT saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunewright.models.registry import get_family
from tunewright.modules.peft.apply import ALIASES, apply_lora, lora_modules
from tunewright.training.atomic import atomic_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def _hf_module(model: nn.Module, ours: str) -> str:
    hf = get_family(model.args.family).weight_map.to_hf(f"{ours}.weight")
    if hf is None:
        raise ValueError(f"module '{ours}' has no Hugging Face name in family {model.args.family}")
    return hf.removesuffix(".weight")


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in _named_adapter_params(model).items()}


def peft_config(model: nn.Module, base_model_path: str | None) -> dict[str, Any]:
    cfg = model.lora_config
    targets = sorted({_hf_module(model, n).rsplit(".", 1)[-1] for n, _ in lora_modules(model)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "use_rslora": cfg["use_rslora"], "use_dora": cfg["use_dora"], "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(model: nn.Module, directory: Path, *, base_model_path: str | None = None) -> None:
    """Write the adapter files into an existing directory (e.g. a checkpoint being written)."""
    from safetensors.torch import save_file

    save_file(peft_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(model, base_model_path), indent=2))


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_path: str | None = None) -> Path:
    with atomic_dir(out_dir) as tmp:
        write_peft_adapter(model, tmp, base_model_path=base_model_path)
    return Path(out_dir)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')} is not supported (only LORA)")
    return cfg


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapter saved in `adapter_dir` (by us or by PEFT) to `model`, in place."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{adapter_dir}: regex target_modules are not supported; list module names")
    unknown = [t for t in targets if t not in ALIASES]
    if unknown:
        raise ValueError(f"{adapter_dir}: adapter targets {unknown} are not modules of a "
                         f"{model.args.family} model")
    apply_lora(model, targets=targets, rank=cfg["r"], alpha=cfg["lora_alpha"],
               dropout=0.0, use_rslora=cfg.get("use_rslora", False), use_dora=cfg.get("use_dora", False))
    expected = _named_adapter_params(model)
    tensors = load_file(str(weights_path))
    # PEFT may save with the adapter name inside the key (".default."); drop it.
    tensors = {k.replace(".default.", ".").replace(".default", ""): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which this model lacks"
        raise ValueError(f"{weights_path}: adapter does not match the base model: it {what}")
    with torch.no_grad():
        for key, param in expected.items():
            t = tensors[key]
            if t.shape != param.shape:
                raise ValueError(f"{weights_path}: adapter does not match the base model: "
                                 f"'{key}' has shape {tuple(t.shape)}, the model needs {tuple(param.shape)}")
            param.copy_(t.to(param.dtype))
    return model


def _named_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    out = {}
    for name, module in lora_modules(model):
        hf = _hf_module(model, name)
        out[f"{PREFIX}{hf}.lora_A.weight"] = module.lora_a.weight
        out[f"{PREFIX}{hf}.lora_B.weight"] = module.lora_b.weight
        if module.magnitude is not None:
            out[f"{PREFIX}{hf}.lora_magnitude_vector"] = module.magnitude
    return out
