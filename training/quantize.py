"""Quantization with torchao: the configs, quantization-aware training (QAT) and post-training
quantization (PTQ) as transforms of a built model, and the quantized model's file format.

A run's `quantization` node names a scheme:

    quantization: {scheme: int8_dynamic_act_int4_weight, group_size: 32, embeddings: false}

| scheme                          | torchao base config                                   | where |
|---------------------------------|-------------------------------------------------------|-------|
| int8_dynamic_act_int4_weight    | Int8DynamicActivationIntxWeightConfig(int4, PerGroup) | any   |
| int4_weight_only                | IntxWeightOnlyConfig(int4, PerGroup)                  | any   |
| int4_weight_only_cuda           | Int4WeightOnlyConfig(group_size)                      | CUDA  |
| float8_dynamic_act_float8_weight| Float8DynamicActivationFloat8WeightConfig()           | CUDA  |
| float8_dynamic_act_int4_weight  | Float8DynamicActivationInt4WeightConfig()             | CUDA  |

Every `nn.Linear` is quantized (the output head too when it is its own layer); `embeddings:
true` also quantizes the token embeddings, weight-only int4 per group (torchao has no activation
quantization for an embedding lookup). A model whose head is tied to its embeddings refuses
`embeddings: true`: the head reads the embedding's raw weight, so fake-quantized training and
the converted model would compute different heads.

QAT is torchao's `QATConfig(base, step="prepare")` (every linear becomes a FakeQuantizedLinear
computing with quantize-then-dequantize weights, and activations for the dynamic schemes), then
`step="convert"` (back to `nn.Linear`, then the base config quantizes it). torchao's fake
quantizers round exactly as its quantized tensors do, so the converted model's output equals
the fake-quantized one bit for bit on CPU (tests/test_quantize.py). The CPU schemes' quantizers
are then swapped for training/fake_quant.py's: torchao's values and gradients bit for bit, in
fewer passes over the tensors (QAT's cost per step; tests/test_fake_quant.py).

LoRA: what gets deployed is the merged weight W + s·BA, quantized. Fake-quantizing only the
frozen base W (torchtune's choice) trains a model that is not the deployed one, as the merged
weight rounds differently; here an adapted layer computes `F.linear(fq(x), fq(W + s·BA))`
instead (torchao's fake quantizers on the merged weight, gradients reaching A and B through the
rounding's straight-through estimator), so the merged-then-quantized export equals the trained
model bit for bit too. The merged form costs a weight-sized add per layer and step, and needs
lora_dropout 0 and no DoRA (both refused in one line). Before `fake_quant_after_n_steps` the
layer computes as plain LoRA. PTQ takes plain models (merge the adapter first).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

CPU_SCHEMES = ("int8_dynamic_act_int4_weight", "int4_weight_only")
CUDA_SCHEMES = ("int4_weight_only_cuda", "float8_dynamic_act_float8_weight", "float8_dynamic_act_int4_weight")
SCHEMES = CPU_SCHEMES + CUDA_SCHEMES

QUANTIZED_FILE = "quantized.safetensors"  # torchao's tensors flattened, with their metadata
QUANTIZATION_FILE = "quantization.json"  # the node that made it, and the dtype it computes in
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as configs write them


@dataclasses.dataclass(frozen=True)
class Quantization:
    scheme: str
    group_size: int = 32
    embeddings: bool = False

    @classmethod
    def from_node(cls, node: dict[str, Any] | "Quantization", *, key: str = "quantization") -> "Quantization":
        """The config node, checked: an unknown key, scheme or a bad group size is one line."""
        if isinstance(node, Quantization):
            return node
        if not isinstance(node, dict):
            raise ValueError(f"{key}: expected a mapping like {{scheme: int4_weight_only, group_size: 32}}")
        names = [f.name for f in dataclasses.fields(cls)]
        for k in node:
            if k not in names:
                raise ValueError(f"{key}.{k}: unknown key; {key} takes {', '.join(names)}")
        if "scheme" not in node:
            raise ValueError(f"{key}.scheme: missing; one of {', '.join(SCHEMES)}")
        if node["scheme"] not in SCHEMES:
            raise ValueError(f"{key}.scheme: '{node['scheme']}' is not one of {', '.join(SCHEMES)}")
        group_size = node.get("group_size", 32)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{key}.group_size: {group_size!r}; expected a positive integer such as 32")
        if not isinstance(node.get("embeddings", False), bool):
            raise ValueError(f"{key}.embeddings: {node['embeddings']!r}; expected true or false")
        return cls(**node)

    def check_device(self, device: torch.device | str) -> None:
        """GPU-only schemes refused on any other device, in one line."""
        if self.scheme in CUDA_SCHEMES and torch.device(device).type != "cuda":
            raise ValueError(f"quantization.scheme: {self.scheme} runs on CUDA only (torchao's kernels), "
                             f"not on {torch.device(device).type}; use {' or '.join(CPU_SCHEMES)} there")


def base_config(q: Quantization) -> Any:
    """torchao's PTQ config for the linear layers."""
    import torchao.quantization as tq

    if q.scheme == "int8_dynamic_act_int4_weight":
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                         weight_granularity=tq.PerGroup(q.group_size))
    if q.scheme == "int4_weight_only":
        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(q.group_size))
    if q.scheme == "int4_weight_only_cuda":
        return tq.Int4WeightOnlyConfig(group_size=q.group_size)
    if q.scheme == "float8_dynamic_act_float8_weight":
        return tq.Float8DynamicActivationFloat8WeightConfig()
    if q.scheme == "float8_dynamic_act_int4_weight":
        return tq.Float8DynamicActivationInt4WeightConfig()
    raise AssertionError(q.scheme)


def embedding_config(q: Quantization) -> Any:
    import torchao.quantization as tq

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(q.group_size))


def _is_linear(module: nn.Module, fqn: str = "") -> bool:
    """A layer to quantize: an nn.Linear holding plain weights, not a LoRA factor."""
    return isinstance(module, nn.Linear) and type(module.weight.data) is torch.Tensor and \
        fqn.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")


def _is_embedding(module: nn.Module, fqn: str = "") -> bool:
    return isinstance(module, nn.Embedding)


def check_model(model: nn.Module, q: Quantization, *, adapters: bool = False) -> None:
    """What torchao would fail on deep inside, said in one line first: an NF4 base, adapters
    (unless `adapters`: QAT's plain LoRA), a tied head with `embeddings`, rows that the group
    size does not divide."""
    from tunewright.modules.peft.apply import expert_lora_modules, lora_modules
    from tunewright.modules.peft.nf4 import is_nf4

    if any(is_nf4(p) for p in model.parameters()):
        raise ValueError("quantization: the model's base is NF4 (QLoRA, quantize_base: true); QAT and PTQ need "
                         "the full-precision weights: set quantize_base: false")
    lora = [m for _, m in lora_modules(model)]
    if lora and not adapters:
        raise ValueError("quantization: PTQ takes a model without LoRA adapters: merge the adapter first "
                         "(save_final_model: true writes merged/)")
    if any(m.use_dora or not isinstance(m.dropout, nn.Identity) for m in lora) or \
            next(expert_lora_modules(model), None) is not None:
        raise ValueError("quantization: QAT with LoRA fake-quantizes the merged weight, which needs lora_dropout: 0, "
                         "use_dora: false and no adapters on MoE experts")
    if q.embeddings and getattr(model, "output", 0) is None:
        raise ValueError("quantization.embeddings: this model's output head is tied to its embeddings and "
                         "would read them unquantized; set embeddings: false")
    if q.scheme in CUDA_SCHEMES and q.scheme != "int4_weight_only_cuda":
        return  # float8 scales per row: any width works
    widths = [(name, m.in_features) for name, m in model.named_modules() if _is_linear(m, name) or m in lora]
    if q.embeddings:
        widths += [(name, m.embedding_dim) for name, m in model.named_modules() if _is_embedding(m)]
    for name, width in widths:
        if width % q.group_size:
            raise ValueError(f"quantization.group_size: {q.group_size} does not divide {name}'s "
                             f"{width} input features; pick a divisor of {width}")


def prepare_qat(model: nn.Module, node: dict[str, Any] | Quantization) -> Quantization:
    """Swap every linear (and embedding, with `embeddings`) for torchao's fake-quantized one,
    in place; parameter names do not change, so checkpoints and exports do not care."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from tunewright.modules.peft.apply import lora_modules
    from tunewright.training.fake_quant import use_fused_fake_quantizers

    q = Quantization.from_node(node)
    check_model(model, q, adapters=True)
    # On the meta device (FSDP2) torchao's swap makes fresh parameters, which would train:
    # the frozen ones (LoRA's base) are frozen again.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    quantize_(model, QATConfig(base_config(q), step="prepare"), filter_fn=_is_linear)
    if q.embeddings:
        quantize_(model, QATConfig(embedding_config(q), step="prepare"), filter_fn=_is_embedding)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    use_fused_fake_quantizers(model)  # torchao's numbers in fewer passes (training/fake_quant.py)
    for _, layer in lora_modules(model):
        _fake_quantize_merged(layer, q)
    return q


def _fake_quantize_merged(layer: nn.Module, q: Quantization) -> None:
    """A LoRA layer computing with its merged weight, fake-quantized (module docstring). The
    quantizers hold no tensors, so the state dict (checkpoints, adapters) does not change."""
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    from tunewright.training.fake_quant import fused_fake_quantizer

    act_config, weight_config = _infer_fake_quantize_configs(base_config(q))
    layer.activation_fake_quantizer = fused_fake_quantizer(act_config) if act_config else None
    layer.weight_fake_quantizer = fused_fake_quantizer(weight_config)
    layer.forward = functools.partial(_merged_fake_quantized_forward, layer, layer.forward)


def _merged_fake_quantized_forward(layer: nn.Module, lora_forward: Callable[[torch.Tensor], torch.Tensor],
                                   x: torch.Tensor) -> torch.Tensor:
    if not layer.weight_fake_quantizer.enabled:  # before fake_quant_after_n_steps: plain LoRA
        return lora_forward(x)
    # merge_lora's weight: base + delta summed in fp32, in the dtype the merged layer will hold
    w = (layer.weight.float() + layer.delta_weight().float()).to(layer.weight.dtype)
    if layer.activation_fake_quantizer is not None:
        x = layer.activation_fake_quantizer(x)
    return F.linear(x, layer.weight_fake_quantizer(w), layer.bias)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer on or off: off, the prepared model computes as the plain one."""
    from torchao.quantization.qat import FakeQuantizerBase

    for m in model.modules():
        if isinstance(m, FakeQuantizerBase):
            m.enabled = enabled


def convert_qat(model: nn.Module, node: dict[str, Any] | Quantization, *, dtype: torch.dtype | None = None) -> None:
    """Fake-quantized layers -> plain ones holding torchao's quantized weights, in place; LoRA
    layers are merged first (into `dtype`, default their adapters' dtype)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    from tunewright.modules.peft.apply import lora_modules, merge_lora

    q = Quantization.from_node(node)
    set_fake_quant(model, True)  # convert quantizes whatever the switch said
    if next(lora_modules(model), None) is not None:
        merge_lora(model, dtype=dtype)  # the weights the adapted layers fake-quantized
    quantize_(model, QATConfig(base_config(q), step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    quantize_(model, base_config(q), filter_fn=_is_linear)  # the merged layers, if any
    if q.embeddings:
        quantize_(model, QATConfig(embedding_config(q), step="convert"),
                  filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedEmbedding))


def quantize_ptq(model: nn.Module, node: dict[str, Any] | Quantization) -> Quantization:
    """Quantize a trained model's weights in place (post-training quantization)."""
    from torchao.quantization import quantize_

    q = Quantization.from_node(node)
    check_model(model, q)
    quantize_(model, base_config(q), filter_fn=_is_linear)
    if q.embeddings:
        quantize_(model, embedding_config(q), filter_fn=_is_embedding)
    return q


# ---------------------------------------------------------------------- files
def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights and buffers hold (a quantized tensor: its data, scales, zeros)."""
    def size(t: torch.Tensor) -> int:
        if type(t) in (torch.Tensor, nn.Parameter):
            return t.numel() * t.element_size()
        names, _ = t.__tensor_flatten__()
        return sum(size(getattr(t, n)) for n in names)

    return sum(size(t) for t in model.state_dict().values())


def save_quantized(model: nn.Module, directory: Path, q: Quantization, *, source_dir: str | Path | None,
                   dtype: torch.dtype) -> Path:
    """The quantized model as a directory: torchao's tensors in a safetensors file (no pickle),
    the quantization node, and the source's config.json and tokenizer files. Atomic."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from tunewright.models.registry import get_family
    from tunewright.training.atomic import atomic_dir, follow_umask

    tensors, metadata = flatten_tensor_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / QUANTIZED_FILE), metadata=metadata)
        info = {**dataclasses.asdict(q), "dtype": _DTYPE_NAMES[dtype]}
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) \
                        and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, tmp / f.name)
        else:
            family = get_family(model.args.family)
            (tmp / "config.json").write_text(json.dumps(family.hf_config(model.args), indent=2))
        follow_umask(tmp)
    return directory


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANTIZED_FILE).is_file()


def load_quantized(path: str | Path, *, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None) -> nn.Module:
    """A model written by `save_quantized`, ready to run (`model: {_component_:
    tunewright.training.quantize.load_quantized, path: ...}` in generate/evaluate configs).
    Read with safetensors: nothing is unpickled. `dtype` must be the one it was made in."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from tunewright.models.pretrained import as_dtype, build_model
    from tunewright.models.registry import model_args

    path = Path(path)
    info_file = path / QUANTIZATION_FILE
    if not is_quantized_dir(path) or not info_file.is_file():
        raise ValueError(f"{path}: not a quantized model (no {QUANTIZED_FILE} and {QUANTIZATION_FILE}); "
                         "tune run quantize writes one")
    info = json.loads(info_file.read_text())
    made_in = info.pop("dtype")
    if dtype is not None and as_dtype(dtype) != as_dtype(made_in):
        raise ValueError(f"{path}: quantized in {made_in}, computes in it only; set dtype: {made_in}")
    q = Quantization.from_node(info, key=str(info_file))
    device = torch.device(device or "cpu")
    q.check_device(device)
    with safe_open(str(path / QUANTIZED_FILE), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    state.update(leftover)
    _, args = model_args(path)
    model = build_model(args)  # on the meta device: the stored tensors are assigned, not copied
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True, strict=True)
    return model.requires_grad_(False).eval()


def dequantized_(model: nn.Module) -> nn.Module:
    """Every quantized weight replaced by its dequantized values, in place: a plain model that
    `save_pretrained` writes (weight-only schemes compute the same; dynamic-activation ones
    differ by the activations' rounding, which a plain model does not do)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if type(p.data) is not torch.Tensor and hasattr(p.data, "dequantize"):
                setattr(module, name, nn.Parameter(p.dequantize(), requires_grad=False))
    return model


def quantize_for_export(model: nn.Module, q: Quantization, *, dtype: torch.dtype, convert: bool) -> dict[str, int]:
    """Cast the model to `dtype` (the compute dtype: fp32 master weights of mixed precision are
    rounded as the deployed model holds them), then convert it (`convert`: a QAT model) or
    quantize it (PTQ), in place. Returns the weights' bytes before and after."""
    from tunewright.modules.peft.apply import merge_lora

    if convert:
        merge_lora(model, dtype=dtype)  # (LoRA) from the fp32 adapters, as the fake quantizers saw them
    model.to(dtype)
    before = weight_bytes(model)
    if convert:
        convert_qat(model, q, dtype=dtype)
    else:
        quantize_ptq(model, q)
    return {"bytes_before": before, "bytes_after": weight_bytes(model)}


def save_quantized_outputs(model: nn.Module, q: Quantization, output_dir: str | Path, *,
                           source_dir: str | Path | None, dtype: torch.dtype, sizes: dict[str, int]) -> None:
    """A quantized model's exports (rank 0): `quantized/` (`save_quantized`), then, dequantized
    in place, `dequantized/` in Hugging Face format."""
    from tunewright.models import save_pretrained
    from tunewright.training import distributed as dist
    from tunewright.training.atomic import human_bytes

    if not dist.is_main():
        return
    output_dir = Path(output_dir)
    before, after = sizes["bytes_before"], sizes["bytes_after"]
    out = save_quantized(model, output_dir / "quantized", q, source_dir=source_dir, dtype=dtype)
    print(f"saved the quantized model ({q.scheme}, group {q.group_size}) to {out}: weights "
          f"{human_bytes(before)} -> {human_bytes(after)} ({after / before:.0%})", flush=True)
    out = save_pretrained(dequantized_(model), output_dir / "dequantized", source_dir=source_dir, dtype=dtype)
    print(f"saved its dequantized copy (Hugging Face format) to {out}", flush=True)


def qat_from_config(cfg: Any) -> Quantization | None:
    """The training recipe's `quantization:` node checked, or None for plain training.
    Refused in one line: tensor parallelism (a row-sharded weight
    would split its quantization groups), a QLoRA NF4 base (fake quantization needs the
    full-precision weights), `fake_quant_after_n_steps` without `quantization`."""
    node = getattr(cfg, "quantization", None)
    if node is None:
        if getattr(cfg, "fake_quant_after_n_steps", None) is not None:
            raise ValueError("fake_quant_after_n_steps: set only for quantization-aware training; add "
                             "quantization: {scheme: int8_dynamic_act_int4_weight} or remove the key")
        return None
    q = Quantization.from_node(node)
    if getattr(cfg, "tensor_parallel_dim", 1) > 1:
        raise ValueError("tensor_parallel_dim: QAT shards with FSDP2 only for now; set tensor_parallel_dim: 1")
    if getattr(cfg, "lora_rank", None) is not None and getattr(cfg, "quantize_base", False):
        raise ValueError("quantize_base: QAT on a QLoRA NF4 base is not possible: fake quantization needs "
                         "the full-precision base weights; set quantize_base: false")
    return q


def export_qat(place: Any, model: nn.Module, q: Quantization, run: Any, cfg: Any, *, write_adapter: bool) -> None:
    """A QAT run's exports into `run.output_dir`: the LoRA adapter (trained through the
    rounding; `adapter/`, with `save_adapter`), torchao's `quantized/` and the HF
    `dequantized/`; `final/` (`merged/` with LoRA) only with `save_final_model: true` (the
    quantized model is the result) or under FSDP2. One device: the prepared model is converted
    in place. FSDP2: the trained weights are gathered into `final/`, and rank 0 quantizes them
    with the base config: the same numbers, as PTQ of the trained weights equals converting the
    fake-quantized model bit for bit (tests/test_quantize.py)."""
    from tunewright.models import load_pretrained
    from tunewright.modules.peft.apply import lora_modules
    from tunewright.training import distributed as dist

    output_dir = Path(run.output_dir)
    if write_adapter and cfg.save_adapter:
        place.save_adapter(model, output_dir / "adapter")
    lora = next(lora_modules(model), None) is not None
    final = output_dir / ("merged" if lora else "final")
    if cfg.save_final_model is True or place.distributed:
        place.save_model(model, final, merge=lora)
    if place.distributed:
        if not dist.is_main():
            return
        model = load_pretrained(final, dtype=place.dtype, device=place.device)
    sizes = quantize_for_export(model, q, dtype=place.dtype, convert=not place.distributed)
    save_quantized_outputs(model, q, output_dir, source_dir=cfg.model.get("path"), dtype=place.dtype, sizes=sizes)
