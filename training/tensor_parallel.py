"""`apply_tensor_parallel(model, tp_mesh)`: Megatron-style tensor parallel of the generic decoder,
through DTensor (`torch.distributed.tensor.parallel`).

In every block attention's q/k/v are sharded by output rows ("colwise": each rank owns
num_heads / tp query heads and num_kv_heads / tp kv heads, whole) and o by input columns
("rowwise"); the gated MLP's gate/up colwise and down rowwise. A block then costs one
all-reduce after attention and one after the MLP, in forward and in backward, and the attention
module runs on its local heads (its head counts are divided in place).

Everything else stays whole on every rank: embeddings, norms, the output head, and q/k norms
(which see the local heads only). These are *replicated DTensors* on the tp mesh rather than
plain tensors so that, after `fully_shard` over the data-parallel mesh, every parameter lives on
the same 2-D (dp, tp) mesh: `clip_grad_norm_` and the optimizers' foreach kernels refuse a mix of
meshes. The head is not vocab-sharded (no loss parallel): each rank computes full logits, and
the loss (`modules/loss.py`, which takes `model.head` / `model.head_weight()`) is unchanged.

The plan is data: block-relative module paths to a style name, `DEFAULT_TP_PLAN` for the
generic decoder, or a family's own `Family.tp_plan`; styles are "colwise", "rowwise",
"per_head" (whole weights on head-sharded input: q/k norms) and "replicate" (kept whole, as is
everything the plan does not name). Paths a block lacks (q/k norms when the family has none) are
skipped. Multi-query attention (one kv head) keeps k/v whole on every rank.

LoRA/DoRA layers (`LoRALinear`) are sharded with their base: colwise puts the base, bias,
`lora_b` and DoRA's magnitude on Shard(0) and keeps `lora_a` whole; rowwise puts the base and
`lora_a` on Shard(1) and keeps `lora_b`, bias and magnitude whole, so the adapted layer is the
same function. Refused, each in one line: heads or kv heads (other than one) or a sharded width
not divisible by the tp size, mixture-of-experts layers (stacked experts run grouped matmuls
DTensor cannot shard), NF4 (QLoRA) base weights, and a model already sharded.

Order (see `training/parallel.py`): adapters -> tensor parallel -> activation checkpointing ->
compile -> FSDP2. Parameter names do not change; the model may still be on the meta device.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor,
)
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from tunewright.modules.attention import Attention
from tunewright.modules.moe import MoE
from tunewright.modules.peft.lora import LoRALinear
from tunewright.modules.peft.nf4 import is_nf4

COLWISE, ROWWISE, PER_HEAD, REPLICATE = "colwise", "rowwise", "per_head", "replicate"
STYLES = (COLWISE, ROWWISE, PER_HEAD, REPLICATE)
_MQA_KV = "mqa_kv"  # not a plan style: chosen for multi-query attention's k/v (`_block_styles`)
# Block-relative module path -> style. PER_HEAD: whole weights applied to each local head, input
# [b, s, heads, head_dim] sharded on the heads (Qwen3's and Gemma-3's q/k norms). REPLICATE: kept
# whole, as is every module the plan does not name.
DEFAULT_TP_PLAN: dict[str, str] = {
    "attn.q_proj": COLWISE, "attn.k_proj": COLWISE, "attn.v_proj": COLWISE, "attn.o_proj": ROWWISE,
    "attn.q_norm": PER_HEAD, "attn.k_norm": PER_HEAD,
    "mlp.gate_proj": COLWISE, "mlp.up_proj": COLWISE, "mlp.down_proj": ROWWISE,
}

# Where each parameter of a sharded LoRALinear goes; anything unnamed is replicated.
_LORA_PLACEMENTS: dict[str, dict[str, Placement]] = {
    COLWISE: {"weight": Shard(0), "bias": Shard(0), "magnitude": Shard(0), "lora_b.weight": Shard(0)},
    ROWWISE: {"weight": Shard(1), "lora_a.weight": Shard(1)},
}


def tp_plan_for(model: nn.Module) -> dict[str, str]:
    """The family's plan when it has one (`Family.tp_plan`), else `DEFAULT_TP_PLAN`."""
    args = getattr(model, "args", None)
    if args is not None:
        from tunewright.models.registry import get_family

        plan = getattr(get_family(args.family), "tp_plan", None)
        if plan is not None:
            return dict(plan)
    return dict(DEFAULT_TP_PLAN)


def check_tensor_parallel(model: nn.Module, tp_size: int, plan: dict[str, str] | None = None) -> None:
    """Raise ValueError (one line) when `model` cannot be split `tp_size` ways under `plan`;
    needs no process group, so a recipe can check its config before starting any."""
    plan = tp_plan_for(model) if plan is None else plan
    if tp_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp_size}")
    bad = sorted(set(plan.values()) - set(STYLES))
    if bad:
        raise ValueError(f"tp_plan: unknown style {bad[0]!r} (styles: {', '.join(STYLES)})")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("tensor parallel: the model is already sharded; apply tensor parallel before fully_shard")
    if any(is_nf4(p) for p in model.parameters()):
        raise ValueError("tensor parallel does not support NF4-quantized (QLoRA) base weights; use LoRA")
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ValueError("tensor parallel: model has no `layers`; it expects the generic decoder")
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, MoE):
                raise ValueError(f"tensor parallel does not support mixture-of-experts layers "
                                 f"(layers.{i}.{name}); train MoE models with FSDP only (tensor_parallel_dim=1)")
            if isinstance(module, Attention) and plan.get(f"{name}.q_proj") == COLWISE:
                _check_attention(f"layers.{i}.{name}", module, plan, name, tp_size)
        for path, style in _block_styles(block, plan, tp_size).items():
            if style in (COLWISE, ROWWISE):
                _check_linear(f"layers.{i}.{path}", _get(block, path), style, tp_size)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, plan: dict[str, str] | None = None) -> None:
    """Shard `model` (the generic decoder, adapters already applied) over the 1-D `tp_mesh`, in
    place. Every rank must hold the same model; weights are taken from the mesh's first rank."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"tensor parallel needs a 1-D mesh (e.g. mesh['tp']), got {tp_mesh.ndim}-D")
    plan = tp_plan_for(model) if plan is None else plan
    tp_size = tp_mesh.size()
    check_tensor_parallel(model, tp_size, plan)
    styles: dict[str, ParallelStyle] = {}
    split_attention: list[Attention] = []
    for i, block in enumerate(model.layers):
        for path, style in _block_styles(block, plan, tp_size).items():
            styles[f"layers.{i}.{path}"] = _STYLES[style]()
        for name, module in block.named_modules():
            if isinstance(module, Attention) and plan.get(f"{name}.q_proj") == COLWISE:
                split_attention.append(module)
    for name in _unplanned_owners(model, set(styles)):
        styles[name] = _Replicated()
    parallelize_module(model, tp_mesh, styles)
    for attn in split_attention:  # `.view(b, s, num_heads, head_dim)` now sees the local heads
        attn.num_heads //= tp_size
        if attn.num_kv_heads > 1:  # multi-query attention keeps its one kv head on every rank
            attn.num_kv_heads //= tp_size
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_settle_grad)
    _local_head(model, tp_mesh)


# ---------------------------------------------------------------- plan and checks
def _block_styles(block: nn.Module, plan: dict[str, str], tp: int) -> dict[str, str]:
    """The plan's paths this block has, with their styles. Multi-query attention (one kv head,
    Gemma-2B, Falcon) keeps k/v whole on every rank: each rank's query heads all read that head;
    its weight gradient, a partial sum per rank, is summed like a q/k norm's."""
    styles = {path: style for path, style in plan.items() if _get(block, path) is not None}
    for name, module in block.named_modules():
        if isinstance(module, Attention) and module.num_kv_heads == 1 and tp > 1 \
                and styles.get(f"{name}.q_proj") == COLWISE:
            styles[f"{name}.k_proj"] = styles[f"{name}.v_proj"] = _MQA_KV
    return styles


def _check_attention(where: str, attn: Attention, plan: dict[str, str], name: str, tp: int) -> None:
    wanted = {"q_proj": COLWISE, "k_proj": COLWISE, "v_proj": COLWISE, "o_proj": ROWWISE}
    if any(plan.get(f"{name}.{proj}") != style for proj, style in wanted.items()):
        raise ValueError(f"tp_plan: {where} must shard q_proj/k_proj/v_proj colwise and o_proj rowwise together")
    if attn.num_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the attention heads: "
                         f"num_heads={attn.num_heads} in {where}")
    if attn.num_kv_heads % tp and attn.num_kv_heads != 1:
        raise ValueError(f"tensor parallel size {tp} must divide the attention heads: "
                         f"num_kv_heads={attn.num_kv_heads} in {where} (or be 1: multi-query attention)")


def _check_linear(where: str, module: nn.Module | None, style: str, tp: int) -> None:
    if not isinstance(module, (nn.Linear, LoRALinear)):
        raise ValueError(f"tp_plan: {where} is a {type(module).__name__}; {style} shards nn.Linear or LoRALinear")
    dim_name = "out_features" if style == COLWISE else "in_features"
    dim = getattr(module, dim_name)
    if dim % tp:
        raise ValueError(f"tensor parallel size {tp} must divide {where}.{dim_name}={dim}")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, nn.Module) else None


def _unplanned_owners(model: nn.Module, planned: set[str]) -> Iterator[str]:
    """The outermost modules holding parameters outside the planned ones (embeddings, norms,
    head): each is replicated whole, with its parameters' children."""
    def walk(prefix: str, module: nn.Module) -> Iterator[str]:
        if prefix in planned:
            return
        if any(p is not None for p in module._parameters.values()):
            yield prefix
            return
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)
    yield from walk("", model)


# ---------------------------------------------------------------- styles
class _ColwiseParallel(ColwiseParallel):
    """torch's colwise style, extended to LoRALinear (base and adapter sharded together)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        return distribute_module(
            module, device_mesh, partial(_place_lora, self.src_data_rank, _LORA_PLACEMENTS[COLWISE]),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class _RowwiseParallel(RowwiseParallel):
    """torch's rowwise style, extended to LoRALinear (base and adapter sharded together)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, partial(_place_lora, self.src_data_rank, _LORA_PLACEMENTS[ROWWISE]),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def _place_lora(src_data_rank: int | None, placements: dict[str, Placement], name: str,
                module: nn.Module, mesh: DeviceMesh) -> None:
    if name:  # distribute_module visits every submodule; the LoRALinear root places them all
        return
    for path, param in list(module.named_parameters()):
        if path not in placements:
            continue  # replicated by distribute_module
        owner_path, _, leaf = path.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner.register_parameter(leaf, nn.Parameter(
            distribute_tensor(param, mesh, [placements[path]], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad,
        ))


class _Replicated(ParallelStyle):
    """Whole parameters on every rank as replicated DTensors; the module takes and returns local
    tensors, its input laid out as `input_layout` (Replicate, or the heads dim for PER_HEAD).

    `output_grad_layout` is what the gradient of the local output is: the output's own layout
    by default; Partial when each rank consumes the whole output with its own heads only (MQA's
    k/v), so backward sums the ranks' shares before they reach the weight and the input."""

    def __init__(self, input_layout: Placement | None = None, output_grad_layout: Placement | None = None) -> None:
        super().__init__()
        self.input_layout = input_layout or Replicate()
        self.output_grad_layout = output_grad_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._input_fn, self._output_fn)

    def _input_fn(self, module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(
            DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
            for x in inputs
        )

    def _output_fn(self, module: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
        grad = None if self.output_grad_layout is None else [self.output_grad_layout]

        def local(o: Any) -> Any:
            return o.to_local(grad_placements=grad) if isinstance(o, DTensor) else o

        return tuple(local(o) for o in outputs) if isinstance(outputs, tuple) else local(outputs)


_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    COLWISE: _ColwiseParallel,
    ROWWISE: _RowwiseParallel,
    PER_HEAD: partial(_Replicated, Shard(2)),  # [b, s, heads, head_dim]
    REPLICATE: _Replicated,
    _MQA_KV: partial(_Replicated, Replicate(), Partial()),
}


# ---------------------------------------------------------------- gradients and head
def _settle_grad(param: torch.Tensor) -> None:
    """A replicated weight used on sharded activations (q/k norms and MQA's k/v on local heads,
    lora_a of a colwise layer, lora_b of a rowwise one) gets a Partial gradient, each rank
    holding its share: sum it now, so
    the optimizer and grad clipping see the param's own layout. (FSDP2 does the same for the
    parameters it wraps, which replace these and drop this hook.)"""
    grad = param.grad
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(placements=param.placements)


def _to_local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_head(model: nn.Module, mesh: DeviceMesh) -> None:
    """The loss calls `model.head(h)` and `model.head_weight()` outside forward on local hidden
    states; with a replicated DTensor head weight both must hand back local tensors. The local
    copy of a replicated weight is the whole matrix, and `to_local`'s backward returns its
    gradient as a replicated DTensor gradient. Set on the instance, as activation checkpointing
    wraps a block's forward, so names and the class stay as they are."""
    head, head_weight = type(model).head, type(model).head_weight

    def tp_head(h: torch.Tensor) -> torch.Tensor:
        return _to_local(head(model, DTensor.from_local(h, mesh, [Replicate()], run_check=False)))

    def tp_head_weight() -> torch.Tensor | None:
        w = head_weight(model)
        return None if w is None else _to_local(w)

    model.head = tp_head
    model.head_weight = tp_head_weight
