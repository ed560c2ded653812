"""Distributed set-up for the FSDP2 recipes: process group, 2-D device mesh, model on the meta
device, and the model transforms in their documented order.

    init_distributed -> build_mesh ("dp", "tp")
    -> build_meta_model -> adapters / NF4 (recipe) -> parallelize:
         tensor parallel -> activation checkpointing -> per-block compile -> FSDP2
    -> materialize -> load the checkpoint shard by shard (`training/sharded_io.py`)

`training/placement.py` runs this set-up for a recipe. The recipe's loop is the same as on one
device: its target counts and losses are summed over the data-parallel group
(`batching.target_count`), so FSDP must sum gradients too (`shard_fsdp2` sets a divide factor
of 1).
"""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from tunewright.training import distributed as dist
from tunewright.training.schema import PositiveInt

_LOAD_PRETRAINED = ("tunewright.models.load_pretrained", "tunewright.models.pretrained.load_pretrained")


@dataclass(kw_only=True)
class ParallelConfig:
    """How a recipe runs over several processes (`training/placement.py`); `batch_size` is per
    process. Only `distributed` and `collective_timeout_minutes` may be set for one device."""

    # null: distributed when torchrun started this process; true: FSDP2 also in one process
    distributed: bool | None = None
    data_parallel_dim: PositiveInt | None = None  # default: world size / tensor_parallel_dim
    tensor_parallel_dim: PositiveInt = 1
    fsdp_cpu_offload: bool = False  # sharded parameters, gradients and optimizer state on CPU
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (less memory)
    # Gradients reduce-scattered in this dtype under mixed precision (training/precision.py);
    # bf16 halves the traffic, fp32 sums many ranks without rounding each partial sum.
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    async_checkpoint: bool = False  # step checkpoints written in the background
    # How long a collective may wait. A sharded save ends in a barrier that waits for the
    # slowest rank's writes; a 70B checkpoint on a slow disk takes many minutes, so the default
    # is well above torch's 10 minutes (gloo) that would kill the run mid-save.
    collective_timeout_minutes: PositiveInt = 60


# ---------------------------------------------------------------- process group and mesh
def init_distributed(device: torch.device, *, timeout_minutes: int = 60) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or make a
    one-process group when run without torchrun. Returns (this rank's device, whether this call
    created the group, so the caller knows to destroy it)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if torch_dist.is_initialized():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch_dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                      timeout=timedelta(minutes=timeout_minutes))
    else:  # plain `python recipe.py` / `tune run` without torchrun flags: world size 1
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    return device, True


def close_distributed(created: bool) -> None:
    dist.set_data_parallel_group(None)
    dist.set_collective_device(None)
    if created and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def build_mesh(device: torch.device, *, data_parallel_dim: int | None, tensor_parallel_dim: int) -> Any:
    """A 2-D ("dp", "tp") device mesh over all ranks; the data-parallel group is what the
    training loop sums losses and target counts over, and what the data is sharded by."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.world_size()
    tp = tensor_parallel_dim
    if tp < 1 or world % tp:
        raise ValueError(f"tensor_parallel_dim={tp} does not divide the world size {world} "
                         f"(processes: torchrun --nproc_per_node)")
    dp = world // tp if data_parallel_dim is None else data_parallel_dim
    if dp < 1 or dp * tp != world:
        raise ValueError(f"data_parallel_dim={dp} x tensor_parallel_dim={tp} must equal the world "
                         f"size {world} (leave data_parallel_dim unset to take world / tp)")
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    dist.set_data_parallel_group(mesh["dp"].get_group() if tp > 1 else None)
    return mesh


# ---------------------------------------------------------------- model on meta
def build_meta_model(model_cfg: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Path]:
    """The model of `model.path`'s config.json on the meta device (no memory), in `dtype`;
    its weights are loaded after sharding (`sharded_io.load_hf_sharded`)."""
    from tunewright.models.pretrained import build_model
    from tunewright.models.registry import family_for_config, read_config
    from tunewright.models.score import with_num_labels

    extra = sorted(set(model_cfg) - {"_component_", "path", "num_labels"})
    if model_cfg.get("_component_") not in _LOAD_PRETRAINED or extra or "path" not in model_cfg:
        raise ValueError("model: the distributed recipes load a Hugging Face directory shard by "
                         "shard; use `_component_: tunewright.models.load_pretrained` with only `path` "
                         "(and `num_labels` for a score head)")
    model_dir = Path(model_cfg["path"])
    config = read_config(model_dir)
    args = family_for_config(config, str(model_dir / "config.json")).args_from_hf(config)
    args = with_num_labels(args, model_cfg.get("num_labels"), model_dir)  # a score head (models/score.py)
    model = build_model(args).to(dtype)
    return model, model_dir


# ---------------------------------------------------------------- transforms, in order
def shard_fsdp2(model: nn.Module, mesh: Any, *, cpu_offload: bool = False,
                reshard_after_forward: bool = True, mp_policy: Any = None) -> None:
    """FSDP2: each block, then the root (embeddings, final norm, head), sharded over `mesh`.

    Gradients are summed, not averaged, over ranks: the loop already divides the loss by the
    target tokens of all ranks, which is what makes 2 ranks x batch 2 equal 1 x batch 4.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    # mp_policy (training/precision.py): fp32 shards gathered in bf16, gradients reduced in fp32.
    options = dict(mesh=mesh, offload_policy=offload, **({"mp_policy": mp_policy} if mp_policy is not None else {}))
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # The root is not resharded after forward: the loss uses its head right after.
    fully_shard(model, reshard_after_forward=False, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # A plain SUM (no PREMUL_SUM, which gloo lacks) with nothing divided after it.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            # A rank may leave a weight without gradient (a batch with no targets skips the head,
            # a router skips an expert): it still joins the reduce-scatter, with zeros.
            module.set_reduce_scatter_unused_params(True, recurse=False)


def parallelize(model: nn.Module, mesh: Any, cfg: Any, *, mp_policy: Any = None) -> None:
    """Tensor parallel, activation checkpointing, per-block compile, FSDP2: in this order
    (each later step wraps what the earlier ones made)."""
    from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

    if cfg.tensor_parallel_dim > 1:
        from tunewright.training.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model, every=cfg.activation_checkpointing_every)
    if cfg.compile:
        compile_blocks(model)
    shard_fsdp2(model, mesh["dp"], cpu_offload=cfg.fsdp_cpu_offload,
                reshard_after_forward=cfg.fsdp_reshard_after_forward, mp_policy=mp_policy)


def materialize(model: nn.Module, device: torch.device, *, cpu_offload: bool = False) -> None:
    """Allocate this rank's shards (uninitialised: the checkpoint fills them next)."""
    model.to_empty(device="cpu" if cpu_offload else device)


def check_nf4_shardable(model: nn.Module, mesh: Any) -> None:
    """QLoRA: FSDP cuts an NF4 weight's rows and each of its scale tensors into one equal part
    per rank; say which layer cannot be cut before FSDP fails deep inside."""
    from tunewright.modules.peft.apply import lora_modules
    from tunewright.modules.peft.nf4 import is_nf4

    if mesh["tp"].size() > 1:
        raise ValueError("quantize_base (QLoRA) with tensor_parallel_dim > 1 is not supported: "
                         "NF4 weights are sharded by FSDP only")
    dp = mesh["dp"].size()
    for name, module in lora_modules(model):
        w = module.weight
        if not is_nf4(w):
            continue
        scale_blocks = w.numel() // (w.block_size * w.scaler_block_size)
        if w.shape[0] % dp or scale_blocks % dp:
            raise ValueError(f"QLoRA over {dp} processes: the NF4 weight of {name} ({w.shape[0]} rows, "
                             f"{scale_blocks} scale blocks) does not split into {dp} equal shards; use "
                             f"fewer processes or leave this layer out of lora_targets")
