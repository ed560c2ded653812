"""Where a recipe's models live: this process's device, or FSDP2 shards (with optional tensor
parallel) over the processes torchrun started. A recipe calls the same methods for both, so one
file runs on a laptop and on a cluster:

    with Placement(cfg) as place:                       # joins torchrun's process group, if any
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        model = place.load_model(cfg.model, adapt=add_lora)
        ...                                             # batches go to place.device
        place.save_model(model, run.output_dir / "final")

One device (`distributed: false`, the default without torchrun): `instantiate(cfg.model)` builds
the model with its weights on `device`, then the transforms run in the documented order:
adapters -> NF4 base (QLoRA) -> `convert` (QAT's fake quantization) -> activation checkpointing ->
per-block compile. Checkpoints are whole tensors (`training/checkpointing.py`); exports are
written directly.

Distributed (launched by torchrun, or `distributed: true` for one process): the model is built
on the meta device, adapters and NF4 are put on it, then `parallel.parallelize` (tensor parallel
-> activation checkpointing -> compile -> FSDP2), and each rank allocates and loads only its
slices of the Hugging Face checkpoint (`sharded_io.py`); adapters get the values one device
would draw. Checkpoints are sharded (DCP) and resume on any number of processes; exports are
gathered one tensor at a time and written by rank 0.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.checkpointing import Export, LocalCheckpointer

# adapt(model) puts adapters on a built model (real or on meta) and returns the adapted paths.
Adapt = Callable[[nn.Module], list[str]]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Placement:
    def __init__(self, cfg: Any) -> None:
        from tunewright.training.parallel import ParallelConfig, build_mesh, init_distributed
        from tunewright.training.precision import Precision, enable_tf32
        from tunewright.training.setup import set_deterministic, setup_device

        self.cfg = cfg
        device = setup_device(cfg.device, cfg.num_threads)
        wanted = getattr(cfg, "distributed", None)
        self.distributed = launched_by_torchrun() if wanted is None else bool(wanted)
        self._created = False
        self.mesh: Any = None
        if self.distributed:
            device, self._created = init_distributed(device, timeout_minutes=cfg.collective_timeout_minutes)
            dist.set_collective_device(device)
            try:
                self.mesh = build_mesh(device, data_parallel_dim=cfg.data_parallel_dim,
                                       tensor_parallel_dim=cfg.tensor_parallel_dim)
            except BaseException:
                self.close()  # `with` never entered: leave no process group behind
                raise
        else:
            if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
                raise ValueError(f"distributed: false, but torchrun started {os.environ['WORLD_SIZE']} "
                                 "processes, which would each train alone; leave distributed unset")
            if isinstance(cfg, ParallelConfig):
                for field in dataclasses.fields(ParallelConfig):
                    if field.name not in ("distributed", "collective_timeout_minutes") and \
                            getattr(cfg, field.name) != field.default:
                        raise ValueError(f"{field.name}: set for a run on one device; it needs several "
                                         "processes (tune run --nproc_per_node N ...) or distributed: true")
        self.device = device
        self.precision = Precision.from_config(cfg)
        self.dtype = self.precision.compute
        enable_tf32(device, getattr(cfg, "tf32", True))
        self._was_deterministic = set_deterministic(getattr(cfg, "deterministic", False))
        self._skeletons: dict[int, nn.Module] = {}  # id(model) -> its unsharded layout, on meta
        self._sources: dict[int, str | None] = {}  # id(model) -> the HF directory it came from

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group this placement joined (and forget the data-parallel group);
        put torch's deterministic setting back as it was."""
        from tunewright.training.setup import set_deterministic

        if hasattr(self, "_was_deterministic"):
            set_deterministic(self._was_deterministic)
        if self.distributed:
            from tunewright.training.parallel import close_distributed

            close_distributed(self._created)
            self._created = False

    # ------------------------------------------------------------------ models
    def load_model(self, model_cfg: dict[str, Any], *, adapt: Adapt | None = None,
                   quantize_base: bool = False, frozen_dtype: torch.dtype | None = None,
                   convert: Callable[[nn.Module], Any] | None = None) -> nn.Module:
        """The config's model with its pretrained weights, transformed and placed (see the
        module docstring for the order); `adapt` puts adapters on it, `quantize_base` turns the
        frozen base of adapted layers into NF4 (QLoRA). `frozen_dtype`: a model that never
        trains (a distillation teacher), stored and computed in that dtype (no master weights,
        no autocast, gathered as stored under FSDP2), in eval mode. `convert(model)` swaps
        modules after the adapters and NF4 (QAT's `training/quantize.py prepare_qat`)."""
        model = self._load_sharded(model_cfg, adapt, quantize_base, frozen_dtype, convert) if self.distributed else \
            self._load_local(model_cfg, adapt, quantize_base, frozen_dtype, convert)
        self._sources[id(model)] = model_cfg.get("path")
        if dist.is_main():
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            where = ""
            if self.distributed:
                where = (f", sharded over {dist.world_size()} process{'es' if dist.world_size() > 1 else ''} "
                         f"(mesh dp={self.mesh['dp'].size()} x tp={self.mesh['tp'].size()})")
            print(f"model: {total:,} parameters, {trainable:,} trainable{where}", flush=True)
            if trainable:
                print(self.precision.describe(), flush=True)
            if hasattr(model, "attention_kernels"):
                kind = "varlen" if getattr(self.cfg, "padding_free", True) else "batch"
                kernels = model.attention_kernels(kind, device=self.device, dtype=self.dtype)
                print("attention: " + ", ".join(f"{name} ({n} layers)" for name, n in kernels.items()), flush=True)
        return model

    def _load_local(self, model_cfg: dict[str, Any], adapt: Adapt | None, quantize_base: bool,
                    frozen_dtype: torch.dtype | None = None, convert: Callable | None = None) -> nn.Module:
        from tunewright.modules.peft.qlora import quantize_base_nf4
        from tunewright.training.instantiate import instantiate
        from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

        if frozen_dtype is not None:  # nothing trains: no transform applies
            return instantiate(model_cfg, dtype=frozen_dtype, device=self.device).requires_grad_(False).eval()
        model = instantiate(model_cfg, dtype=self.precision.load_dtype(full=adapt is None), device=self.device)
        if adapt is not None:
            adapt(model)
        if quantize_base:
            quantize_base_nf4(model)
        if convert is not None:
            convert(model)
        self.precision.apply(model)  # weights that train -> master_dtype; bf16 compute by autocast
        if self.cfg.enable_activation_checkpointing:
            apply_activation_checkpointing(model, every=self.cfg.activation_checkpointing_every)
        if self.cfg.compile:
            compile_blocks(model)
        return model

    def _load_sharded(self, model_cfg: dict[str, Any], adapt: Adapt | None, quantize_base: bool,
                      frozen_dtype: torch.dtype | None = None, convert: Callable | None = None) -> nn.Module:
        from tunewright.modules.peft.qlora import quantize_base_nf4
        from tunewright.training.parallel import (build_meta_model, check_nf4_shardable, materialize,
                                                  parallelize)
        from tunewright.training.sharded_io import init_adapters, load_hf_sharded

        load_dtype = frozen_dtype or self.precision.load_dtype(full=adapt is None)
        model, model_dir = build_meta_model(model_cfg, load_dtype)
        if frozen_dtype is not None:
            model.requires_grad_(False).eval()
        adapter_rng = torch.get_rng_state()  # the adapters' initial values are drawn from here
        adapted = adapt(model) if adapt is not None else []
        self.precision.apply(model, autocast=False)  # FSDP2's MixedPrecisionPolicy casts instead
        self._skeletons[id(model)] = copy.deepcopy(model)  # unsharded names, shapes, merging
        if quantize_base:
            quantize_base_nf4(model)
            check_nf4_shardable(model, self.mesh)
        if convert is not None:
            convert(model)
        parallelize(model, self.mesh, self.cfg, mp_policy=None if frozen_dtype else self.precision.fsdp_policy())
        materialize(model, self.device, cpu_offload=self.cfg.fsdp_cpu_offload)
        load_hf_sharded(model, model_dir, dtype=load_dtype)
        if adapted:
            init_adapters(model, adapted, adapter_rng)
        return model

    # ------------------------------------------------------------------ checkpoints and exports
    def checkpointer(self) -> Any:
        """How step checkpoints are written: whole tensors by rank 0, or DCP shards by every rank."""
        if not self.distributed:
            return LocalCheckpointer()
        from tunewright.training.dcp_checkpoint import ShardedCheckpointer

        return ShardedCheckpointer(async_save=self.cfg.async_checkpoint)

    def adapter_export(self, model: nn.Module) -> Export:
        """`export(dir)` writing `model`'s LoRA adapter in PEFT format into a directory (every
        step checkpoint gets one); under FSDP every rank joins the gather."""
        from tunewright.models.peft_adapter import write_peft_adapter
        from tunewright.training.sharded_io import write_peft_adapter_sharded

        base = self._sources.get(id(model))
        if self.distributed:
            return partial(write_peft_adapter_sharded, model, self._skeletons[id(model)], base_model_path=base)
        return partial(write_peft_adapter, model, base_model_path=base)

    def save_adapter(self, model: nn.Module, directory: Path) -> Path | None:
        """The LoRA adapter in PEFT format; the directory on rank 0 (None elsewhere). Refuses
        weights holding NaN or infinity, and a directory holding anything but an adapter."""
        from tunewright.models.peft_adapter import save_peft_adapter
        from tunewright.training.nonfinite import check_finite_parameters
        from tunewright.training.sharded_io import save_peft_adapter_sharded

        check_finite_parameters([model], directory)
        base = self._sources.get(id(model))
        if self.distributed:
            out = save_peft_adapter_sharded(model, self._skeletons[id(model)], directory, base_model_path=base)
        else:
            out = save_peft_adapter(model, directory, base_model_path=base) if dist.is_main() else None
        if out is not None:
            print(f"saved the adapter (PEFT format) to {out}", flush=True)
        return out

    def save_results(self, model: nn.Module, run: Any, cfg: Any, *, write_adapter: bool) -> None:
        """A training run's exports into `run.output_dir`: the LoRA adapter (`adapter/`, PEFT
        format) when `write_adapter` and `save_adapter`; the model in Hugging Face format when
        `save_final_model` (null: yes for full fine-tuning, no with LoRA, whose adapter is the
        result, unless no adapter can be written), as `final/`, or `merged/` with the adapters
        folded in."""
        lora = getattr(cfg, "lora_rank", None) is not None
        save_final = cfg.save_final_model if cfg.save_final_model is not None else not (lora and write_adapter)
        if write_adapter and cfg.save_adapter:
            self.save_adapter(model, run.output_dir / "adapter")
        if save_final:
            self.save_model(model, run.output_dir / ("merged" if lora else "final"), merge=lora)

    def save_model(self, model: nn.Module, directory: Path, *, merge: bool = False) -> Path | None:
        """`model` in Hugging Face format (config and tokenizer copied from where it came
        from); `merge` folds LoRA adapters into the weights first (on one device, in place).
        The directory on rank 0, None elsewhere. Refuses weights holding NaN or infinity, and a
        directory holding anything but a Hugging Face model."""
        from tunewright.models import save_pretrained
        from tunewright.modules.peft.apply import merge_lora
        from tunewright.training.nonfinite import check_finite_parameters
        from tunewright.training.sharded_io import save_pretrained_sharded

        check_finite_parameters([model], directory)
        source = self._sources.get(id(model))
        # The compute dtype (fp32 master weights are a training device; merged adapters are
        # computed in fp32 first), which is the checkpoint's own dtype in the usual case.
        dtype = self.dtype
        if self.distributed:
            out = save_pretrained_sharded(model, self._skeletons[id(model)], directory, source_dir=source,
                                          dtype=dtype, merge=merge)
        elif dist.is_main():
            if merge:
                merge_lora(model)
            out = save_pretrained(model, directory, source_dir=source, dtype=dtype)
        else:
            out = None
        if out is not None:
            what = "merged model" if merge else "fine-tuned model"
            print(f"saved the {what} (Hugging Face format) to {out}", flush=True)
        return out
