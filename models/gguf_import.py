"""`gguf_to_hf`: a llama-architecture GGUF (llama.cpp) -> a Hugging Face model directory.

The output is what `load_pretrained`, `load_tokenizer` and transformers read: `config.json`
(LlamaForCausalLM), `model.safetensors` (dequantized to fp32 or bf16), `tokenizer.json`,
`tokenizer_config.json` (with the chat template) and `generation_config.json`.

Three things a GGUF stores differently from HF:
- names: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight` (table below);
- q/k rows: llama.cpp's converter permutes them for its interleaved-pair RoPE; we undo it to
  get HF's rotate-half layout;
- Llama-3.1 rope scaling: stored as a `rope_freqs.weight` tensor of per-frequency divisors,
  not as config values; we recover the HF `rope_scaling` dict and check it reproduces them.

Everything is validated (header, tensor extents against the file size, architecture, tensor
types, names and shapes, tokenizer) before the output directory is touched; tensors are then
dequantized and written one at a time, into a temporary directory renamed on success.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunewright.models.gguf_file import SUPPORTED_TYPES, GGUFFile, read_gguf
from tunewright.models.gguf_tokenizer import hf_tokenizer_files, special_ids

from tunewright.models.gguf_names import LAYER_NAMES as _LAYER_NAMES
from tunewright.models.gguf_names import ROPE_FREQS as _ROPE_FREQS
from tunewright.models.gguf_names import TOP_NAMES as _TOP_NAMES

# --dtype -> (safetensors dtype, torch_dtype in config.json)
DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16")}
_ITEMSIZE = {"F32": 4, "BF16": 2}  # bytes per value of each safetensors dtype we write


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "fp32",
               overwrite: bool = False) -> Path:
    """Convert a llama GGUF into an HF model directory at `out_dir`; returns `out_dir`.

    `out_dir` must be absent, empty or a Hugging Face model directory (whose files the new ones
    replace), unless `overwrite=True`. Every problem with the input is a one-line `ValueError`
    naming the file, raised before anything is written.
    """
    from tunewright.models.pretrained import HF_MODEL
    from tunewright.training.atomic import check_output_dir, output_dir

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (use one of {', '.join(DTYPES)})")
    path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.is_dir() and path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"{out_dir}: holds the input {path}; write the output elsewhere")
    check_output_dir(out_dir, HF_MODEL, overwrite=overwrite)  # before reading a multi-GB file
    g = read_gguf(path)
    config, plan = _config_and_plan(g)
    tok_files = hf_tokenizer_files(g.metadata, path, max_length=config["max_position_embeddings"])

    st_dtype, config["torch_dtype"] = DTYPES[dtype]
    ids = special_ids(g.metadata)
    generation = {k: v for k, v in {"bos_token_id": ids.get("bos"), "pad_token_id": ids.get("pad"),
                                    "eos_token_id": _eos_ids(ids)}.items() if v is not None}
    need = sum(math.prod(shape) for _, shape, _ in plan) * _ITEMSIZE[st_dtype]
    with output_dir(out_dir, HF_MODEL, overwrite=overwrite, need_bytes=need) as tmp:
        _write_safetensors(tmp / "model.safetensors", plan, st_dtype)
        files = {"config.json": config, "generation_config.json": generation, **tok_files}
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def _eos_ids(ids: dict[str, int]) -> int | list[int] | None:
    eos = [ids[r] for r in ("eos", "eot") if r in ids]
    return None if not eos else eos[0] if len(set(eos)) == 1 else eos


# One planned output tensor: HF name, shape, and a function giving it as float32.
_Planned = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def _config_and_plan(g: GGUFFile) -> tuple[dict[str, Any], list[_Planned]]:
    """config.json for the file and the tensors to write, after checking names and shapes."""
    meta, path = g.metadata, g.path
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture '{arch}' is not supported (only 'llama' GGUFs are)")
    if meta.get("llama.expert_count", 0) > 0:
        raise ValueError(f"{path}: a mixture-of-experts llama GGUF "
                         f"(llama.expert_count={meta['llama.expert_count']}) is not supported")
    for info in g.tensors.values():
        if info.type_name not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor '{info.name}' is {info.type_name}, which is not "
                             f"supported (supported: {', '.join(SUPPORTED_TYPES)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata 'llama.{key}' is missing")
        if isinstance(value, list):
            raise ValueError(f"{path}: per-layer 'llama.{key}' is not supported")
        # float32 in the file: write the shortest decimal that round-trips (1e-05, not 9.99e-06).
        return float(str(np.float32(value))) if f"llama.{key}" in g.float32_keys else value

    dim, num_layers, num_heads = get("embedding_length"), get("block_count"), get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if min(dim, num_layers, num_heads, num_kv_heads) <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{path}: bad shape metadata (dim {dim}, {num_layers} layers, "
                         f"{num_heads} heads, {num_kv_heads} kv heads)")
    head_dim = get("attention.key_length", dim // num_heads)
    if head_dim != get("attention.value_length", head_dim) or head_dim != get("rope.dimension_count", head_dim):
        raise ValueError(f"{path}: value or rotary dim differs from the key dim {head_dim}; not supported")
    if head_dim % 2:
        raise ValueError(f"{path}: head dim {head_dim} is odd; RoPE needs an even one")
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{path}: has no 'token_embd.weight' tensor")
    vocab_size = g.tensors["token_embd.weight"].shape[0]
    tied = "output.weight" not in g.tensors
    theta = get("rope.freq_base", 10000.0)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": dim, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": theta,
        "rope_scaling": _rope_scaling(g, get, head_dim, theta),
        "max_position_embeddings": get("context_length"), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False,
    }
    ids = special_ids(meta)
    config.update({f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad") if role in ids})
    num_tokens = len(meta.get("tokenizer.ggml.tokens") or []) or vocab_size
    if num_tokens != vocab_size or meta.get("llama.vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"{path}: token_embd has {vocab_size} rows but the vocabulary has {num_tokens} "
                         f"tokens (llama.vocab_size={meta.get('llama.vocab_size')})")

    ffn, q_rows, kv_rows = config["intermediate_size"], num_heads * head_dim, num_kv_heads * head_dim
    shapes = {"token_embd.weight": (vocab_size, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab_size, dim)
    layer_shapes = {"attn_q": (q_rows, dim), "attn_k": (kv_rows, dim), "attn_v": (kv_rows, dim),
                    "attn_output": (dim, q_rows), "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim),
                    "ffn_down": (dim, ffn), "attn_norm": (dim,), "ffn_norm": (dim,)}
    for i in range(num_layers):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in layer_shapes.items()})
    for name in g.tensors:
        if name not in shapes and name != _ROPE_FREQS:
            raise ValueError(f"{path}: tensor '{name}' has no place in a {num_layers}-layer llama model")
    plan: list[_Planned] = []
    for name, shape in shapes.items():
        if name not in g.tensors:
            raise ValueError(f"{path}: tensor '{name}' is missing")
        if g.tensors[name].shape != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {g.tensors[name].shape}, "
                             f"the metadata implies {shape}")
        n_head = num_heads if ".attn_q." in name else num_kv_heads if ".attn_k." in name else None
        plan.append((_hf_name(name), shape, _loader(g, name, n_head)))
    return config, sorted(plan, key=lambda p: p[0])


def _hf_name(name: str) -> str:
    parts = name.split(".")  # blk.N.attn_q.weight | token_embd.weight
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"


def _loader(g: GGUFFile, name: str, n_head: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        w = g.tensor(name)
        return w if n_head is None else unpermute_qk(w, n_head=n_head)
    return load


def unpermute_qk(w: np.ndarray, *, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_scaling(g: GGUFFile, get: Callable, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = g.metadata.get("llama.rope.scaling.type", "none")
    linear = g.metadata.get("llama.rope.scale_linear")  # the key older files use
    if kind == "linear" or (kind == "none" and linear not in (None, 1.0)):
        factor = get("rope.scaling.factor") if kind == "linear" else float(str(np.float32(linear)))
        return {"rope_type": "linear", "factor": factor}
    if kind != "none":
        raise ValueError(f"{g.path}: rope scaling type '{kind}' is not supported (linear and "
                         "Llama-3 rope_freqs are)")
    if _ROPE_FREQS not in g.tensors:
        return None
    return _llama3_rope_scaling(g.tensor(_ROPE_FREQS), head_dim=head_dim, theta=theta, path=g.path)


def _llama3_rope_scaling(
    freq_factors: np.ndarray, *, head_dim: int, theta: float, path: Path
) -> dict[str, Any]:
    """HF `rope_scaling` for a `rope_freqs` tensor, checked to reproduce it.

    llama.cpp divides frequency i by `freq_factors[i]`; for Llama 3.1-3.3 they come from the
    `llama3` formula with factor = the largest divisor and Meta's low/high factors 1 and 4 over
    an original context of 8192 (the only values these releases use).
    """
    scaling = {"rope_type": "llama3", "factor": float(str(np.float32(freq_factors.max()))),
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old, low, high = 8192.0, 1.0, 4.0
    smooth = (old / wavelen - low) / (high - low)
    want = np.where(wavelen < old / high, 1.0, np.where(
        wavelen > old / low, scaling["factor"], 1 / ((1 - smooth) / scaling["factor"] + smooth)))
    if freq_factors.shape != want.shape or not np.allclose(freq_factors, want, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight is not Llama-3 rope scaling with the standard "
                         "parameters; not supported")
    return scaling


def _write_safetensors(path: Path, plan: list[_Planned], st_dtype: str) -> None:
    """Write the tensors one at a time (only one is ever in memory) in safetensors format."""
    itemsize = _ITEMSIZE[st_dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in plan:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, load in plan:
            data = _to_bytes(load(), st_dtype)
            assert len(data) == math.prod(shape) * itemsize, name
            f.write(data)


def _to_bytes(w: np.ndarray, st_dtype: str) -> bytes:
    if st_dtype == "F32":
        return np.ascontiguousarray(w, dtype="<f4").tobytes()
    import torch  # numpy has no bfloat16; torch rounds to nearest even

    return torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
