"""`export_gguf`: a Hugging Face model directory -> one GGUF file llama.cpp (and Ollama) runs.

The inverse of `gguf_import.py`, doing what llama.cpp's `convert_hf_to_gguf.py` does:
- names: HF -> GGUF through the family's table (`gguf_arch.py`, `gguf_names.py`); MoE experts
  stacked into one [experts, out, in] tensor per projection;
- weights: q/k rows permuted for llama-architecture models (interleaved-pair RoPE), Gemma's
  norms stored as 1 + weight, Llama-3.1 rope scaling and Phi-3 LongRoPE as factor tensors;
- types: 2-D and larger weights in the requested type (`OUT_TYPES`), 1-D tensors, the MoE
  router and the RoPE factors in F32, and Q8_0 tensors whose rows are not whole 32-value
  blocks in F16 (llama.cpp's fallbacks); `general.file_type` is the requested type;
- metadata: llama.cpp's keys for the architecture and the tokenizer (`gguf_vocab.py`).

Everything is checked (config, every tensor's name and shape, the tokenizer, what llama.cpp
cannot represent) before the file is opened; tensors are then converted and written one at a
time under a temporary name, renamed on success.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunewright.models.args import ModelArgs
from tunewright.models.gguf_arch import ARCHS, GGUFArch, context_length
from tunewright.models.gguf_names import ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, ROPE_FREQS, TOP_NAMES

# --out-type -> (ggml type of the weights, llama.cpp's LlamaFileType for general.file_type)
OUT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}


@dataclass
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: str  # ggml type written
    load: Callable[[], np.ndarray]  # float32, already transformed


def default_output(model_dir: str | Path, out_type: str) -> Path:
    """`<dir>-<type>.gguf` beside the model directory (`merged` -> `merged-q8_0.gguf`)."""
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}-{out_type}.gguf"


def export_gguf(model_dir: str | Path, out_type: str = "f16", output: str | Path | None = None, *,
                overwrite: bool = False) -> Path:
    """Write the model in `model_dir` as a GGUF of `out_type` at `output` (default:
    `default_output`); returns the path. Every problem is a one-line `ValueError` raised before
    anything is written; an existing `output` is replaced only with `overwrite`."""
    from tunewright.models.gguf_vocab import read_vocab

    model_dir = Path(model_dir)
    family, args, arch = check_exportable(model_dir, out_type)
    output = Path(output) if output is not None else default_output(model_dir, out_type)
    if output.exists() and not overwrite:
        raise ValueError(f"{output}: already exists (pass --force / overwrite=True to replace it)")
    plan = _plan(model_dir, family, args, arch, OUT_TYPES[out_type][0])
    vocab = read_vocab(model_dir, args.vocab_size)
    _write(output, model_dir, arch, args, plan, vocab, file_type=OUT_TYPES[out_type][1])
    return output


def check_exportable(model_dir: str | Path, out_type: str) -> tuple[Any, ModelArgs, GGUFArch]:
    """(family, args, llama.cpp architecture) of the model in `model_dir` from its config.json
    alone (no weight is read), or the one-line reason it cannot be exported as `out_type`."""
    from importlib.util import find_spec

    from tunewright.models.registry import model_args

    if find_spec("gguf") is None:
        raise ValueError("GGUF export needs the gguf package: pip install 'tunewright[gguf]'")
    if out_type not in OUT_TYPES:
        raise ValueError(f"GGUF output type '{out_type}' is not one we write (use one of {', '.join(OUT_TYPES)})")
    try:
        family, args = model_args(model_dir)
    except FileNotFoundError as e:  # no directory or no config.json: a bad input like the others
        raise ValueError(str(e)) from None
    arch = ARCHS.get(family.name)
    if arch is None:
        raise ValueError(f"{model_dir}: model family '{family.name}' has no GGUF export "
                         f"(exportable: {', '.join(ARCHS)})")
    problem = _problem(arch, args)
    if problem is not None:
        raise ValueError(f"{model_dir}: this {family.name} model has {problem}; llama.cpp's "
                         f"'{arch.arch}' cannot represent it")
    return family, args, arch


def _problem(arch: GGUFArch, a: ModelArgs) -> str | None:
    if a.num_labels is not None:
        return "a score head (a reward/value model), not a language-model head"
    if a.resolved_out_bias != a.attn_bias and arch.arch != "qwen2":
        return "q/k/v biases without an o_proj bias"
    return arch.problem(a)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for interleaved-pair RoPE (rotate-half halves -> pairs); the
    inverse of `gguf_import.unpermute_qk`. Works on weights [rows, in] and biases [rows]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored_tensors(model_dir: Path, weight_map: Any) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """HF name (canonical) -> (file, shape, stored name), from the safetensors headers only."""
    from safetensors import safe_open

    from tunewright.models.pretrained import _naming_file, safetensors_files

    out = {}
    for path in safetensors_files(model_dir):
        with _naming_file(path), safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if not weight_map.skips(name):
                    out[weight_map.canonical(name)] = (path, tuple(f.get_slice(name).get_shape()), name)
    return out


def _reader(path: Path, stored_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(stored_name).float().numpy()
    return load


def _plan(model_dir: Path, family: Any, args: ModelArgs, arch: GGUFArch, qtype: str) -> list[_Planned]:
    """Every GGUF tensor: name, shape, type and how to make it, after checking each stored
    tensor against the shapes `args` implies."""
    from tunewright.models.pretrained import build_model, hf_state_dict

    want = {n: tuple(t.shape) for n, t in hf_state_dict(build_model(args), family).items()}
    stored = _stored_tensors(model_dir, family.weight_map)
    if args.tie_embeddings:
        want.pop("lm_head.weight", None)
        stored.pop("lm_head.weight", None)  # some tied checkpoints also store the shared head
    for name, (path, shape, _) in stored.items():
        if name not in want:
            raise ValueError(f"{path}: tensor '{name}' has no place in a {family.name} model of this config")
        if shape != want[name]:
            raise ValueError(f"{path}: tensor '{name}' has shape {shape}, config.json implies {want[name]}")
    missing = sorted(set(want) - set(stored))
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks '{missing[0]}' ({len(missing)} tensors missing)")

    top = {f"{hf}.weight": f"{g}.weight" for g, hf in TOP_NAMES.items()}
    layer = [(re.compile(r"^model\.layers\.(\d+)\." + re.escape(hf).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias)$"),
              g, "{}" in hf) for g, hf in arch.names.items()]
    plan: dict[str, _Planned] = {}
    experts: dict[str, list[Callable[[], np.ndarray]]] = {}
    for name in sorted(want, key=_natural):
        path, shape, stored_name = stored[name]
        load, gguf_name, is_expert = _reader(path, stored_name), top.get(name), False
        if gguf_name is None:
            for pattern, g, is_expert in layer:
                if m := pattern.match(name):
                    block, *expert, kind = m.groups()
                    gguf_name = f"blk.{block}.{g}.{kind}"
                    break
            else:
                raise ValueError(f"{model_dir}: tensor '{name}' has no place in llama.cpp's '{arch.arch}' layout")
        if is_expert:  # the expert's slice of a stacked tensor, filled in expert order
            experts.setdefault(gguf_name, []).append(load)
            shape = (args.num_experts, *shape)
            load = _stack(experts[gguf_name])
        else:
            load = _transform(load, gguf_name.split(".")[-2], arch, args)
        plan[gguf_name] = _Planned(gguf_name, shape, _tensor_type(gguf_name, shape, qtype), load)
    for name, values in _rope_tensors(arch, args).items():
        plan[name] = _Planned(name, values.shape, "F32", lambda v=values: v)
    return sorted(plan.values(), key=lambda p: _natural(p.name))


def _natural(name: str) -> list[Any]:
    """blk.2 before blk.10, as llama.cpp orders them."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _stack(loads: list[Callable[[], np.ndarray]]) -> Callable[[], np.ndarray]:
    return lambda: np.stack([load() for load in loads])


def _transform(load: Callable[[], np.ndarray], gguf_name: str, arch: GGUFArch,
               a: ModelArgs) -> Callable[[], np.ndarray]:
    n_head = {"attn_q": a.num_heads, "attn_k": a.num_kv_heads}.get(gguf_name) if arch.permute_qk else None
    shift = arch.norm_shift if gguf_name.endswith("norm") else 0.0
    if n_head is None and not shift:
        return load
    return lambda: permute_qk(load(), n_head) if n_head is not None else load() + np.float32(shift)


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """llama.cpp's choice: 1-D tensors and the MoE router in F32; Q8_0 rows must be whole blocks."""
    if len(shape) == 1 or ".ffn_gate_inp." in name:
        return "F32"
    if qtype == "Q8_0" and shape[-1] % 32:
        return "F16"
    return qtype


def _rope_tensors(arch: GGUFArch, a: ModelArgs) -> dict[str, np.ndarray]:
    scaling = a.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return {ROPE_FREQS: _llama3_rope_freqs(a.rope_base, a.resolved_head_dim, scaling)}
    if kind == "longrope":
        return {ROPE_FACTORS_LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
                ROPE_FACTORS_SHORT: np.asarray(scaling["short_factor"], dtype=np.float32)}
    return {}


def _llama3_rope_freqs(theta: float, head_dim: int, s: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1 rope scaling, as llama.cpp's converter computes them."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return math.prod(shape) // block * size


def _encode(values: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(values, dtype=np.float32), GGMLQuantizationType[qtype])


def _write(output: Path, model_dir: Path, arch: GGUFArch, a: ModelArgs, plan: list[_Planned], vocab: Any,
           *, file_type: int) -> None:
    import gguf

    from tunewright.models.gguf_vocab import write_vocab
    from tunewright.training.atomic import _sibling, check_free_space, disk_full_error, file_mode, is_disk_full

    need = sum(_nbytes(p.shape, p.qtype) for p in plan)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(output, need)
    tmp = _sibling(output, "tmp")
    w = gguf.GGUFWriter(str(tmp), arch.arch)
    try:
        w.add_name(model_dir.resolve().name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(a.vocab_size)
        w.add_context_length(context_length(arch, a))
        w.add_embedding_length(a.dim)
        w.add_block_count(a.num_layers)
        w.add_feed_forward_length(a.intermediate_dim)
        w.add_head_count(a.num_heads)
        w.add_head_count_kv(a.num_kv_heads)
        w.add_rope_freq_base(a.rope_base)
        w.add_layer_norm_rms_eps(a.norm_eps)
        arch.metadata(w, a)
        write_vocab(w, vocab)
        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype),
                              raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:  # one tensor in memory at a time
            data = _encode(p.load(), p.qtype)
            assert data.nbytes == _nbytes(p.shape, p.qtype), p.name
            w.write_tensor_data(data)
        w.close()
        tmp.chmod(file_mode())
        tmp.replace(output)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(output, need) from None
        raise
