"""Checkpoint in and out of a sharded (FSDP2 / tensor-parallel) model, never whole on one rank.

Loading: every rank reads the Hugging Face checkpoint one tensor at a time, maps it through the
family's weight map (renames, fused and per-expert rules) and keeps only its own slice
(`distribute_tensor(..., src_data_rank=None)` slices locally, with no communication).

Export: every rank gathers one tensor at a time (`DTensor.full_tensor()`), one output file at a
time; rank 0 writes each file as soon as it is gathered, with the source checkpoint's file names
and sharding. Names, shapes and the LoRA merge come from an unsharded copy of the model on the
meta device (the "skeleton", taken before the model is sharded), so export reuses the
single-device code (`merge_lora`, `write_peft_adapter`) on full tensors.

Export callables are collective: every rank must call them, in the same order.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tunewright.models.family import Family
from tunewright.models.pretrained import iter_model_tensors
from tunewright.models.score import HEAD, fresh_score_weights
from tunewright.models.score import weight_map as score_weight_map
from tunewright.modules.moe import Experts
from tunewright.modules.peft.apply import expert_lora_modules, lora_modules
from tunewright.modules.peft.expert_lora import LoRAExperts
from tunewright.modules.peft.lora import LoRALinear
from tunewright.modules.peft.nf4 import is_nf4, nf4_module
from tunewright.training import distributed as dist


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# ---------------------------------------------------------------- loading
@torch.no_grad()
def load_full_into(model: nn.Module, name: str, full: torch.Tensor) -> None:
    """Put this rank's slice of the full tensor `full` into the (sharded) parameter `name`."""
    param = model.get_parameter(name)
    if not _is_dtensor(param):
        param.copy_(full)
        return
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    local = param._local_tensor
    if is_nf4(local):
        # Quantize the whole weight as one device would, then keep this rank's rows: the same
        # NF4 values as on one device. (A rank cannot quantize its rows alone: NF4's double
        # quantization subtracts the mean of all the weight's block scales. So one whole weight
        # at a time passes through the GPU, for speed; never the model.) A new parameter replaces the empty one (its constant
        # tensors were left on meta by to_empty); FSDP takes it up at its lazy init.
        if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
            raise ValueError("QLoRA: NF4 weights are sharded by FSDP only, without tensor parallel")
        nf4 = nf4_module().to_nf4(full.to(local.device), local.block_size, local.scaler_block_size)
        mesh = param.device_mesh
        chunk = torch.chunk(nf4, mesh.size(), dim=0)[mesh.get_local_rank()]
        owner, _, leaf = name.rpartition(".")
        sharded = DTensor.from_local(chunk, mesh, param.placements, shape=param.shape, stride=param.stride())
        setattr(model.get_submodule(owner), leaf, nn.Parameter(sharded, requires_grad=False))
        return
    shard = host_slice(full, param)
    if shard is None:  # a layout `host_slice` does not cut (FSDP x TP's strided shards)
        shard = distribute_tensor(full.to(local.device), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
    assert shard.shape == local.shape, (name, shard.shape, local.shape)
    local.copy_(shard)  # only this rank's slice crosses to the GPU


def host_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor | None:
    """This rank's slice of `full` for the DTensor `param`, cut where `full` lies (the CPU), so
    a rank never holds a whole tensor on its GPU; None for placements other than plain
    Shard/Replicate. Same cut as `distribute_tensor` (torch.chunk along each sharded dim)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(type(p) not in (Shard, Replicate) for p in param.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    out = full
    for dim, (size, start) in enumerate(zip(shape, offset)):
        if size != full.shape[dim]:
            out = out.narrow(dim, start, size)
    return out


def adapter_param_names(model: nn.Module) -> set[str]:
    """Names of the LoRA parameters (not in a base checkpoint)."""
    names = set()
    for path, m in lora_modules(model):
        names |= {f"{path}.lora_a.weight", f"{path}.lora_b.weight"}
        if m.magnitude is not None:
            names.add(f"{path}.magnitude")
    for path, m in expert_lora_modules(model):
        names |= {f"{path}.lora.{n}" for n, _ in m.lora.named_parameters()}
    return names


def load_hf_sharded(model: nn.Module, model_dir: Path, *, dtype: torch.dtype) -> None:
    """Fill a materialised sharded model from a Hugging Face checkpoint, one tensor at a time;
    DoRA magnitudes start, as on one device, at the norms of the loaded base rows."""
    from tunewright.models.registry import get_family

    family = get_family(model.args.family)
    params = dict(model.named_parameters())
    adapters = adapter_param_names(model)
    fresh = fresh_score_weights(model, model_dir)  # a new score head on a causal LM's checkpoint
    shapes = {n: p.shape for n, p in params.items() if n not in adapters and n not in fresh}
    dora = {f"{path}.weight": f"{path}.magnitude" for path, m in lora_modules(model) if m.magnitude is not None}
    for name, full in iter_model_tensors(model_dir, family, shapes, dtype=dtype,
                                              tie_embeddings=model.args.tie_embeddings,
                                              num_labels=model.args.num_labels):
        if name in dora:
            magnitude = dora[name]
            load_full_into(model, magnitude, full.norm(dim=1).to(params[magnitude].dtype))
        load_full_into(model, name, full)
    for name, full in fresh.items():
        load_full_into(model, name, full.to(dtype))


@torch.no_grad()
def init_adapters(model: nn.Module, adapted: list[str], rng_state: torch.Tensor) -> None:
    """Give the LoRA weights the values the single-device recipe draws: the adapters are made
    again on the CPU in `apply_lora`'s order (`adapted`), from the RNG state `apply_lora` started
    from, and each rank keeps its slice. Leaves the RNG where a single device would be."""
    torch.set_rng_state(rng_state)
    for path in adapted:
        module = model.get_submodule(path)
        if isinstance(module, LoRAExperts):
            with torch.device("meta"):
                stub = Experts(module.num_experts, module.gate_proj.shape[2], module.gate_proj.shape[1])
            stub = stub.to(module.gate_proj.dtype).to_empty(device="cpu")
            fresh = LoRAExperts(stub, projections=list(module.lora), rank=module.rank, alpha=module.alpha,
                                mode=module.mode, use_rslora=module.use_rslora)
            for name, value in fresh.lora.named_parameters():
                load_full_into(model, f"{path}.lora.{name}", value)
        else:
            assert isinstance(module, LoRALinear), path
            # Drawn in the base's dtype, as `LoRALinear` draws them on one device, then raised to
            # the adapter's own (master) dtype by `load_full_into`: the same values.
            dtype = module.weight.dtype
            with torch.device("meta"):
                stub = nn.Linear(module.in_features, module.out_features, bias=False, dtype=dtype)
            fresh = LoRALinear(stub.to_empty(device="cpu"), rank=module.rank, alpha=module.alpha,
                               use_rslora=module.use_rslora, use_dora=module.use_dora)
            # DoRA's magnitude came from the real base weights at load time.
            load_full_into(model, f"{path}.lora_a.weight", fresh.lora_a.weight)
            load_full_into(model, f"{path}.lora_b.weight", fresh.lora_b.weight)


# ---------------------------------------------------------------- export
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (sharded) tensor on every rank, on the CPU; NF4 dequantized."""
    t = t.detach()
    if _is_dtensor(t):
        from torch.distributed.tensor import DTensor

        local = t._local_tensor
        if is_nf4(local):  # rows of an NF4 weight dequantize on their own
            local = local.get_original_weight()
            t = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
        t = t.full_tensor()
    elif is_nf4(t):
        t = t.get_original_weight()
    return t.cpu()


def _filled(skeleton: nn.Module, path: str, params: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the skeleton's module `path` holding the model's full tensors."""
    module = copy.deepcopy(skeleton.get_submodule(path))
    for name, _ in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        value = full_tensor(params[f"{path}.{name}" if path else name])
        setattr(module.get_submodule(owner) if owner else module, leaf,
                nn.Parameter(value, requires_grad=False))
    return module


def _full_value(model_params: dict[str, torch.Tensor], skeleton: nn.Module, name: str, merge: bool,
                merged_experts: dict[str, nn.Module]) -> torch.Tensor:
    """Our parameter `name` of the exported model, whole: merged with its adapter if `merge`.
    `merged_experts` keeps a merged expert block per path, so its three stacked projections
    are gathered and merged once, not once each."""
    path, _, leaf = name.rpartition(".")
    owner = skeleton.get_submodule(path) if path else skeleton
    if merge and isinstance(owner, LoRALinear) and leaf == "weight":
        return _filled(skeleton, path, model_params).merged_weight()
    if merge and isinstance(owner, LoRAExperts) and hasattr(owner, leaf):
        if path not in merged_experts:
            merged_experts[path] = _filled(skeleton, path, model_params).merged(torch.float32)
        return getattr(merged_experts[path], leaf).detach()
    return full_tensor(model_params[name])


def save_pretrained_sharded(
    model: nn.Module, skeleton: nn.Module, out_dir: str | Path, *, source_dir: str | Path | None = None,
    dtype: torch.dtype | None = None, merge: bool = False, overwrite: bool = False,
) -> Path | None:
    """`save_pretrained` for a sharded model (collective); with `merge`, LoRA is merged in.
    Returns the directory on rank 0, None elsewhere."""
    from tunewright.models.pretrained import HF_MODEL, _shard_plan, hf_state_dict, write_pretrained
    from tunewright.models.registry import get_family
    from tunewright.modules.peft.apply import merge_lora
    from tunewright.training.atomic import check_output_dir

    check_output_dir(out_dir, HF_MODEL, overwrite=overwrite)  # every rank: before any gather

    family = get_family(skeleton.args.family)
    weights = score_weight_map(family.weight_map, skeleton.args.num_labels)
    target = merge_lora(copy.deepcopy(skeleton)) if merge else skeleton  # meta: names and shapes
    source = Path(source_dir) if source_dir is not None else None
    plan = _shard_plan(list(hf_state_dict(target, family)), source, family)
    model_params = dict(model.named_parameters())
    base_dtype = next(p.dtype for n, p in model_params.items() if "lora" not in n)
    shapes = {n: t for n, t in target.state_dict().items()}  # meta: sizes without memory
    need = sum(t.numel() * (dtype or base_dtype).itemsize for t in shapes.values())

    def files() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for fname, hf_names in plan.items():
            ours = list(dict.fromkeys(n for hf in hf_names for n in weights.place(hf).ours))
            merged_experts: dict[str, nn.Module] = {}  # per file: held only while it is written
            full = {n: _full_value(model_params, skeleton, n, merge, merged_experts).to(dtype or base_dtype)
                    for n in ours}
            hf = weights.hf_tensors(full)
            yield fname, {n: hf[n].contiguous() for n in hf_names}

    if not dist.is_main():
        for _ in files():  # join every gather; rank 0 writes
            pass
        dist.barrier()
        return None
    out = write_pretrained(out_dir, skeleton.args, files(), source_dir=source, overwrite=overwrite,
                           need_bytes=need)
    dist.barrier()
    return out


def write_peft_adapter_sharded(model: nn.Module, skeleton: nn.Module, directory: Path, *,
                               base_model_path: str | None = None) -> None:
    """`write_peft_adapter` for a sharded model (collective): the adapter tensors are gathered
    into a copy of the skeleton, which rank 0 writes into the existing `directory`."""
    from tunewright.models.peft_adapter import write_peft_adapter

    model_params = dict(model.named_parameters())
    view = copy.deepcopy(skeleton)
    view_params = dict(view.named_parameters())
    score = {HEAD} if view.args.num_labels is not None else set()  # a score head trains whole, saved with it
    for name in sorted(adapter_param_names(view) | score):
        value = full_tensor(model_params[name])
        owner, _, leaf = name.rpartition(".")
        setattr(view.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=view_params[name].requires_grad))
    if dist.is_main():
        write_peft_adapter(view, Path(directory), base_model_path=base_model_path)
    dist.barrier()


def save_peft_adapter_sharded(model: nn.Module, skeleton: nn.Module, out_dir: str | Path, *,
                              base_model_path: str | None = None, overwrite: bool = False) -> Path | None:
    """`save_peft_adapter` for a sharded model (collective); the directory on rank 0."""
    from tunewright.models.peft_adapter import PEFT_ADAPTER
    from tunewright.training.atomic import check_output_dir, output_dir

    check_output_dir(out_dir, PEFT_ADAPTER, overwrite=overwrite)  # every rank: before the gather
    if not dist.is_main():
        write_peft_adapter_sharded(model, skeleton, Path(out_dir), base_model_path=base_model_path)
        return None
    with output_dir(out_dir, PEFT_ADAPTER, overwrite=overwrite) as tmp:
        write_peft_adapter_sharded(model, skeleton, tmp, base_model_path=base_model_path)
    return Path(out_dir)
