"""A resumed run's config against the one its checkpoint was taken with.

Each checkpoint holds a fingerprint of its run's config: a short hash per key (`optimizer.lr`,
`batch_size`, ...), never the values, so no secret from the environment is written. On resume
the keys whose hash changed are sorted into those that apply from the resumed step on (said in
one line) and those that cannot (the run refuses, naming them): a changed shape (model, LoRA
rank or targets), a changed data order (dataset, batch size, seed, shuffling), or state that
the checkpoint restores (optimizer, schedule). A key no rule names is refused too: a recipe's
own key is not known to apply mid-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tunewright.training.errors import ConfigError

# `batch_size` is per process: what orders the data is the batch of all data-parallel ranks, so a
# run resumes on another number of processes with the same global batch (the sampler converts).
GLOBAL_BATCH = "global batch (batch_size x data-parallel processes)"


# Top-level key -> what changing it on resume means. Refused keys say why.
REFUSED = {
    "recipe": "another algorithm",
    **dict.fromkeys(("dtype", "master_dtype"), "the weights' precision"),
    **dict.fromkeys(("model", "tokenizer"), "the model or its vocabulary"),
    **dict.fromkeys(("lora_rank", "lora_targets", "lora_experts", "use_dora", "quantize_base"),
                    "the adapters' shapes"),
    **dict.fromkeys(("lora_alpha", "lora_dropout", "use_rslora"), "the adapters' scale"),
    **dict.fromkeys(("dataset", GLOBAL_BATCH, "gradient_accumulation_steps", "seed", "shuffle",
                     "group_by_length", "max_steps_per_epoch"), "the data order"),
    **dict.fromkeys(("optimizer", "lr_scheduler", "optimizer_in_backward"),
                    "restored from the checkpoint"),
}
# Keys about how this invocation starts, not about the run: never a change.
IGNORED = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"}
APPLIES = {
    "max_steps": "the schedule is recomputed for the new total",
    "epochs": "the schedule is recomputed for the new total",
    **dict.fromkeys((
        "val_dataset", "metric_logger",
        "device", "num_threads", "loss_chunk_size", "padding_free", "num_workers", "pin_memory",
        "clip_grad_norm", "compile",
        "enable_activation_checkpointing", "activation_checkpointing_every", "enable_activation_offloading",
        "log_every_n_steps", "eval_every_n_steps", "max_eval_batches", "save_every_n_steps",
        "keep_last_n_checkpoints", "save_final_model", "save_adapter", "progress_bar", "on_nonfinite",
        "max_nonfinite_steps", "distributed", "tensor_parallel_dim", "data_parallel_dim", "fsdp_cpu_offload",
        "fsdp_reshard_after_forward", "async_checkpoint", "collective_timeout_minutes",
        "reduce_dtype", "tf32", "deterministic"), ""),
}


def config_values(cfg: Any) -> dict[str, Any]:
    """The config as nested plain values (a recipe's `Config` dataclass, or a mapping)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compared(values: dict[str, Any], data_parallel: int) -> dict[str, Any]:
    leaves = _leaves(values)
    if isinstance(leaves.get("batch_size"), int):
        leaves[GLOBAL_BATCH] = leaves.pop("batch_size") * data_parallel
    return leaves


def fingerprint(cfg: Any, *, data_parallel: int = 1) -> dict[str, str]:
    """Dotted key -> a hash of its value (`data_parallel`: the run's data-parallel processes)."""
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key, value in _compared(config_values(cfg), data_parallel).items()}


def _shown(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """`key a -> b` with short plain values (from the saved config.yaml when there is one),
    else the key alone."""
    def short(value: Any) -> str | None:
        text = json.dumps(value, default=str)
        return text if isinstance(value, (int, float, bool, str, type(None), list)) and len(text) <= 40 else None

    before, after = short(old[key]) if key in old else None, short(new.get(key))
    return f"{key} {before} -> {after}" if before is not None and after is not None else key


def check_config_change(saved: dict[str, str] | None, cfg: Any, *, step_dir: Path, saved_config: Path | None,
                        data_parallel: tuple[int, int] = (1, 1)) -> str | None:
    """Refuse (ConfigError naming the keys) a change that cannot apply to a run resumed from
    `step_dir`; returns the line to print about the changes that do apply, if any.
    `saved`: the checkpoint's fingerprint (None for a checkpoint older than fingerprints);
    `saved_config`: its config.yaml, for showing old values; `data_parallel`: the data-parallel
    processes of the saving run and of this one."""
    if not saved:
        return None
    now = fingerprint(cfg, data_parallel=data_parallel[1])
    changed = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k] and k not in IGNORED)
    if not changed:
        return None
    old = _compared(_read_yaml(saved_config), data_parallel[0]) if saved_config is not None else {}
    new = _compared(config_values(cfg), data_parallel[1])
    refused, applied = [], []
    for key in changed:
        top = key.split(".", 1)[0]
        if top in APPLIES:
            note = APPLIES[top]
            applied.append(_shown(key, old, new) + (f" ({note})" if note else ""))
        else:
            why = REFUSED.get(top, "not known to apply to a resumed run")
            refused.append(f"{_shown(key, old, new)} ({why})")
    if refused:
        raise ConfigError(f"resume_from_checkpoint: the config changed since {step_dir}: "
                         f"{'; '.join(refused)}: such changes cannot apply to a resumed run; restore "
                         "them, or start a new run (another output_dir, or overwrite_output_dir=true)")
    return f"resuming with changes that apply from here on: {'; '.join(applied)}"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a config.yaml we cannot read only costs the old values in the message
        return {}
    return values if isinstance(values, dict) else {}
