"""Hugging Face checkpoints in and out: `config.json` + safetensors (one file or sharded).

Loading builds the model on the meta device and assigns each tensor as it is read, so a model
is never held twice in memory; names go through the family's weight map, and every mismatch
(unknown tensor, wrong shape, missing weight) is one line naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from tunewright.data.files import read_json
from tunewright.models.args import ModelArgs
from tunewright.models.family import Family
from tunewright.models.registry import get_family, model_args, read_config
from tunewright.models.score import (add_score_head, classification_config, fresh_score_weights,
                                     with_num_labels)
from tunewright.models.score import weight_map as score_weight_map
from tunewright.training.atomic import OutputKind, output_dir, tensor_bytes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of a model directory that are weights or describe weights: not copied on save.
_WEIGHT_FILES = {INDEX_FILE, "pytorch_model.bin.index.json", "config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _is_hf_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(_is_weight_file(p.name) for p in directory.iterdir())


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_FILE


# A directory with config.json and safetensors weights; re-saving into one replaces its weight
# files (a differently sharded model leaves no stale shard behind), other files stay.
HF_MODEL = OutputKind("a Hugging Face model", _is_hf_model, stale=_is_weight_file)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (use one of fp32, bf16, fp16)")
    return DTYPES[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' of tensor name -> file name")
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index}: lists {f.name}, which is missing")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights (model.safetensors or {INDEX_FILE})")
    return files


def iter_hf_tensors(
    model_dir: Path, skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of every stored tensor; those `skip` names are never read."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with _naming_file(path):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if skip is None or not skip(name):
                        yield path, name, f.get_tensor(name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (an adapter, a checkpoint's weights); a truncated
    or foreign file is one line naming it."""
    from safetensors.torch import load_file

    with _naming_file(path):
        return load_file(str(path))


@contextlib.contextmanager
def _naming_file(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        if isinstance(e, (ValueError, FileNotFoundError)) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot read safetensors file (truncated, or not safetensors?): {e}") from None


_CHECKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_finite(tensor: torch.Tensor, name: str, path: Path) -> None:
    """ValueError naming the tensor and file when `tensor` holds a NaN or an infinity: training
    from it gives NaN from the first step. One min/max reduction, no copy (NaN propagates
    through both, an infinity shows in one)."""
    if tensor.dtype in _CHECKED_DTYPES and tensor.numel():
        low, high = torch.aminmax(tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            what = "NaN" if torch.isnan(low) or torch.isnan(high) else "infinite"
            raise ValueError(f"{path}: tensor '{name}' holds {what} values; the file is damaged "
                             f"or came from a run that diverged")


def build_model(args: ModelArgs, *, device: str | torch.device = "meta") -> nn.Module:
    family = get_family(args.family)
    with torch.device(device):
        model = family.build(args)
    model.args = args  # what save_pretrained and transforms need to know about the shape
    if args.num_labels is not None:  # a reward / value model
        add_score_head(model, args.num_labels)
    return model


def load_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    num_labels: int | None = None,
) -> nn.Module:
    """A model from a Hugging Face directory; `model(tokens)` gives logits [b, s, vocab].

    `dtype` defaults to fp32 (training master weights), `device` to the CPU. `num_labels` asks
    for a score head (a reward or value model, `models/score.py`): a *ForSequenceClassification
    checkpoint has its own, a causal LM gets a fresh one in place of its LM head.
    """
    model_dir = Path(path)
    family, args = model_args(model_dir)
    args = with_num_labels(args, num_labels, model_dir)
    model = build_model(args)
    load_hf_weights(model, model_dir, family, dtype=as_dtype(dtype), device=device or "cpu")
    return model


def iter_model_tensors(
    model_dir: Path, family: Family, shapes: dict[str, torch.Size], *, dtype: torch.dtype,
    tie_embeddings: bool, num_labels: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, full tensor in `dtype`) for each of our parameters in `shapes`, one at a time,
    from the checkpoint in `model_dir`, through the family's weight map (renames, fused parts,
    experts, one per tensor or all in one). Every mismatch (unknown tensor, wrong shape, missing or doubled weight)
    is one line naming the file and the tensor. A single process collects them all
    (`load_hf_weights`); a sharded model keeps a slice of each (`training/sharded_io.py`).
    With `num_labels`, the head is a score head (`score.weight`, `models/score.py`)."""
    weights = score_weight_map(family.weight_map, num_labels)
    seen: set[str] = set()
    stacks: dict[str, tuple[torch.Tensor, set[int]]] = {}  # stacked experts being filled
    for path, hf_name, tensor in iter_hf_tensors(model_dir, weights.skips):
        place = weights.place(hf_name)
        if place is None or any(n not in shapes for n in place.ours):
            if weights.canonical(hf_name) == "lm_head.weight" and tie_embeddings:
                continue  # some tied checkpoints also store the shared head
            raise ValueError(f"{path}: tensor '{hf_name}' has no place in a {family.name} model "
                             f"of this config (wrong family or config.json?)")
        parts = [tuple(shapes[n]) for n in place.ours]
        if place.expert is not None:
            want = parts[0][1:]
        elif place.transposed:  # [E, in, sum(out)] from our [E, out, in] parts
            want = (parts[0][0], parts[0][2], sum(s[1] for s in parts))
        elif place.fused:
            want = (sum(s[0] for s in parts), *parts[0][1:])
        else:
            want = parts[0]
        if tuple(tensor.shape) != want or (place.expert is not None and place.expert >= parts[0][0]):
            got = f"shape {tuple(tensor.shape)}" if tuple(tensor.shape) != want else f"expert {place.expert}"
            raise ValueError(f"{path}: tensor '{hf_name}' has {got}, config.json implies {want}"
                             + (f" x {parts[0][0]} experts" if place.expert is not None else ""))
        if place.expert is None and place.ours[0] in seen:
            raise ValueError(f"{path}: tensor '{hf_name}' is stored twice in {model_dir}")
        check_finite(tensor, hf_name, path)
        tensor = tensor.to(dtype)
        if place.expert is not None:
            name = place.ours[0]
            stack, filled = stacks.setdefault(name, (torch.empty(parts[0], dtype=dtype), set()))
            stack[place.expert] = tensor
            filled.add(place.expert)
            if len(filled) == parts[0][0]:
                seen.add(name)
                yield name, stacks.pop(name)[0]
        elif place.transposed:
            for name, part in zip(place.ours, tensor.split([s[1] for s in parts], dim=-1)):
                seen.add(name)
                yield name, part.transpose(1, 2).contiguous()
        elif place.fused:
            for name, part in zip(place.ours, tensor.split([s[0] for s in parts])):
                seen.add(name)
                yield name, part
        else:
            seen.add(place.ours[0])
            yield place.ours[0], tensor
    for name, (stack, filled) in stacks.items():
        lacking = min(set(range(stack.shape[0])) - filled)
        hf_name = weights.describe(name).replace("*", str(lacking))
        raise ValueError(f"{model_dir}: checkpoint lacks '{hf_name}' (it stores {len(filled)} "
                         f"experts, config.json declares {stack.shape[0]})")
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks '{weights.describe(missing[0])}' "
                         f"({len(missing)} tensors missing)")


def load_hf_weights(
    model: nn.Module, model_dir: Path, family: Family, *, dtype: torch.dtype,
    device: str | torch.device,
) -> None:
    fresh = fresh_score_weights(model, model_dir)  # a new score head on a causal LM's checkpoint
    shapes = {name: t.shape for name, t in model.state_dict(keep_vars=True).items() if name not in fresh}
    loaded = {name: t.to(device) for name, t in iter_model_tensors(
        model_dir, family, shapes, dtype=dtype, tie_embeddings=model.args.tie_embeddings,
        num_labels=model.args.num_labels)}
    loaded.update({name: t.to(device=device, dtype=dtype) for name, t in fresh.items()})
    model.load_state_dict(loaded, assign=True, strict=True)


def hf_state_dict(model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    state = {name: t.detach() for name, t in model.state_dict().items()}
    weights = score_weight_map(family.weight_map, model.args.num_labels)
    return {k: v.contiguous() for k, v in weights.hf_tensors(state).items()}


def _shard_plan(names: list[str], source_dir: Path | None, family: Family) -> dict[str, list[str]]:
    """Same file names and grouping as the source checkpoint, else one file."""
    if source_dir is not None and (source_dir / INDEX_FILE).is_file():
        stored = json.loads((source_dir / INDEX_FILE).read_text())["weight_map"]
        # Source names under an alias prefix (a multimodal checkpoint's text model) as we write them.
        weight_map = {family.weight_map.canonical(n): f for n, f in stored.items()}
        plan: dict[str, list[str]] = defaultdict(list)
        fallback = sorted(set(weight_map.values()))[-1]
        for n in names:
            plan[weight_map.get(n, fallback)].append(n)
        return dict(plan)
    return {SINGLE_FILE: names}


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` in Hugging Face format so `transformers` loads it; atomic.

    With `source_dir`, its config.json (the family's text-only one if the source is multimodal),
    tokenizer and generation files are copied and its sharding is kept; `dtype` casts the saved
    tensors (default: as they are in the model). `out_dir` must be absent, empty or a Hugging
    Face model directory, unless `overwrite` (training/atomic.py's `output_dir`).
    """
    family = get_family(model.args.family)
    source = Path(source_dir) if source_dir is not None else None
    tensors = hf_state_dict(model, family)
    if dtype is not None:
        tensors = {k: v.to(as_dtype(dtype)) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    plan = _shard_plan(list(tensors), source, family)
    files = ((fname, {n: tensors[n] for n in names}) for fname, names in plan.items())
    return write_pretrained(out_dir, model.args, files, source_dir=source, overwrite=overwrite,
                            need_bytes=tensor_bytes(tensors))


def write_pretrained(
    out_dir: str | Path,
    args: ModelArgs,
    files: Iterable[tuple[str, dict[str, torch.Tensor]]],
    *,
    source_dir: Path | None = None,
    overwrite: bool = False,
    need_bytes: int | None = None,
) -> Path:
    """A Hugging Face directory from its weight files, written as `files` yields them (a
    sharded model gathers one file at a time), then the index, config.json and the source's
    tokenizer and generation files; atomic, into an `output_dir` of kind `HF_MODEL`
    (`need_bytes`, the weights' size, is checked against the free space first)."""
    from safetensors.torch import save_file

    family = get_family(args.family)
    config: dict[str, Any] = read_config(source_dir) if source_dir is not None else family.hf_config(args)
    if config.get("model_type") in family.multimodal_types:  # we save only its text model
        config = family.hf_config(args)
    if args.num_labels is not None:  # transformers' *ForSequenceClassification
        config = classification_config(config, args, source_dir)
    weight_map: dict[str, str] = {}
    total, saved_dtype = 0, None
    out_dir = Path(out_dir)
    with output_dir(out_dir, HF_MODEL, overwrite=overwrite, need_bytes=need_bytes) as tmp:
        for fname, tensors in files:
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            saved_dtype = saved_dtype or next(iter(tensors.values())).dtype
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if source_dir is not None:
            for f in source_dir.iterdir():
                if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
    return out_dir
