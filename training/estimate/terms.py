"""The terms of a run's memory, per process: what each model keeps, the optimizer's state, the
activations of one micro-batch, the loss's buffers, the KV cache of generation.

    est = estimate(cfg, world_size=8, device_type="cuda")   # cfg: a recipe's Config
    est.terms, est.total, est.notes

Sharded terms (weights, gradients, optimizer state of FSDP2-sharded models) are divided by the
number of processes; activations, the loss and the KV cache belong to each process's own
micro-batch and are not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from tunewright.training.estimate.activations import kv_cache_bytes, loss_bytes, measure
from tunewright.training.estimate.devices import CPU_RUNTIME
from tunewright.training.estimate.model import ParamBytes, build_meta, model_args, param_bytes

PAIRED = ("dpo", "reward_model")  # a batch row is a pair: chosen and rejected rows go through together
REFERENCE_FREE = ("simpo", "orpo")  # dpo losses that need no reference model


@dataclass
class Term:
    name: str
    bytes: int  # per process, on the run's device
    note: str = ""
    host_bytes: int = 0  # moved to host memory (activation offloading on a GPU)


@dataclass
class Estimate:
    terms: list[Term]
    notes: list[str] = field(default_factory=list)  # assumptions: where the shape came from, tokens
    params: dict[str, ParamBytes] = field(default_factory=dict)  # model key -> its parameters
    activations: Any = None  # the measured `Activations` of a training micro-batch
    loading: int = 0  # host memory while the checkpoint is read (one process on the CPU), before training

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def peak(self) -> int:
        """The larger of the training total and the loading phase."""
        return max(self.total, self.loading)

    @property
    def host_total(self) -> int:
        return sum(t.host_bytes for t in self.terms)

    def biggest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def term(self, name: str) -> Term | None:
        return next((t for t in self.terms if t.name == name), None)


# optimizer component -> states per weight (each the size of the weight), or a function of a
# tensor's numel and itemsize for torchao's low-bit optimizers: a tensor of >= 4096 elements gets
# two states of `bits`-bit codes, an fp32 scale per block and a code book of 2^bits fp32 values
# (none for fp8); smaller tensors keep full-precision states. Adam-family optimizers also keep
# an fp32 `step` scalar per tensor.
def _lowbit(bits: int, block: int, codebook: bool = True):
    def state(numel: int, itemsize: int) -> int:
        if numel >= 4096 and numel % block == 0:
            return 2 * (numel * bits // 8 + 4 * (numel // block) + (4 * 2**bits if codebook else 0)) + _STEP_SCALAR
        return 2 * numel * itemsize + _STEP_SCALAR
    return state


_STEP_SCALAR = 4
_ADAM_STEP = ("AdamW", "Adam", "NAdam", "RAdam", "Adamax")
OPTIMIZER_STATES: dict[str, Any] = {
    "AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2,
    "Adagrad": 1, "RMSprop": 1, "Adadelta": 2, "Rprop": 2,
    "AdamW8bit": _lowbit(8, 256), "Adam8bit": _lowbit(8, 256), "AdamWFp8": _lowbit(8, 256, codebook=False),
    "AdamFp8": _lowbit(8, 256, codebook=False), "AdamW4bit": _lowbit(4, 128), "Adam4bit": _lowbit(4, 128),
}


def optimizer_bytes(optimizer_cfg: dict[str, Any], numels: list[int], itemsize: int) -> tuple[int, str]:
    """(bytes, note) of the optimizer state for trainable tensors of `numels` elements each,
    kept in a dtype of `itemsize` bytes."""
    component = str(optimizer_cfg.get("_component_", ""))
    name = component.rsplit(".", 1)[-1]
    total = sum(numels)
    if name == "SGD":
        momentum = float(optimizer_cfg.get("momentum", 0) or 0)
        return (total * itemsize if momentum else 0), ("momentum buffer" if momentum else "no momentum: no state")
    states = OPTIMIZER_STATES.get(name)
    note = ""
    if states is None:
        states, note = 2, f"{component}: not in the table, taken as AdamW (2 states)"
    if callable(states):
        return sum(states(n, itemsize) for n in numels), note or f"{name}: low-bit states"
    amsgrad = 1 if optimizer_cfg.get("amsgrad") else 0
    step = _STEP_SCALAR * len(numels) if name in _ADAM_STEP else 0
    return (states + amsgrad) * total * itemsize + step, note or f"{states + amsgrad} state(s) per weight"


@dataclass
class Workload:
    rows: int  # sequences in one micro-batch's forward
    seq_len: int  # tokens of each, at most
    kv_rows: int = 0  # sequences decoded together (generation), 0: none
    kv_len: int = 0


def _max_seq_len(cfg: Any, args_max: int) -> int:
    for node in (getattr(cfg, "dataset", None), getattr(cfg, "tokenizer", None)):
        if isinstance(node, dict) and node.get("max_seq_len"):
            return int(node["max_seq_len"])
    return args_max


def workload(cfg: Any, args_max: int) -> Workload:
    """The largest micro-batch and decode batch of the recipe, from its config."""
    recipe = cfg.recipe
    seq = _max_seq_len(cfg, args_max)
    batch = getattr(cfg, "batch_size", 1)
    if recipe in PAIRED:
        return Workload(rows=batch if getattr(cfg, "loss", "dpo") == "kto" else 2 * batch, seq_len=seq)
    if recipe in ("grpo", "ppo"):  # batch_size: completions (GRPO) or prompts of one completion (PPO)
        prompt = (cfg.dataset or {}).get("max_prompt_len") or seq
        length = int(prompt) + cfg.max_new_tokens
        return Workload(rows=max(batch // cfg.num_minibatches, 1), seq_len=length, kv_rows=batch, kv_len=length)
    if recipe == "knowledge_distillation" and cfg.lmbda > 0:
        return Workload(rows=batch, seq_len=seq, kv_rows=batch, kv_len=seq + cfg.max_new_tokens)
    if recipe == "evaluate":
        return Workload(rows=batch, seq_len=seq, kv_rows=cfg.generate_batch_size, kv_len=seq + cfg.max_new_tokens)
    if recipe == "generate":  # a prompt's tokens are at most its UTF-8 bytes, plus a chat template's
        length = len(cfg.prompt.encode()) + len((cfg.system_prompt or "").encode()) + 64 + cfg.max_new_tokens
        return Workload(rows=0, seq_len=0, kv_rows=1, kv_len=length)
    return Workload(rows=batch, seq_len=seq)


def estimate(cfg: Any, *, world_size: int = 1, device_type: str = "cpu", size: str | None = None,
             activations: bool = True) -> Estimate:
    """The memory terms of the run `cfg` (a recipe's validated Config) per process, with
    `world_size` processes sharding the models (FSDP2/TP), on a `device_type` device;
    `activations=False` leaves out the forward on meta tensors (the parameter terms only)."""
    from tunewright.models.pretrained import as_dtype
    from tunewright.training.estimate.activations import Activations

    compute = as_dtype(cfg.dtype)
    master = as_dtype(getattr(cfg, "master_dtype", None) or cfg.dtype)
    if master.itemsize < compute.itemsize:
        master = compute
    trains = hasattr(cfg, "optimizer")  # a training recipe's Config (TrainConfig)
    lora = getattr(cfg, "lora_rank", None) is not None
    qlora = lora and getattr(cfg, "quantize_base", False)
    args, source = model_args(cfg.model, size=size)
    est = Estimate(terms=[], notes=[f"model: {source}"])
    shard = max(world_size, 1)
    sharded = f" / {shard} processes" if shard > 1 else ""

    model = build_meta(args, cfg, adapters=lora)
    p = param_bytes(model, master=master, compute=compute, quantize_base=qlora, trains=trains)
    est.params["model"] = p
    if trains:
        kind = "adapters" if lora else "weights that train"
        est.terms.append(Term(kind, p.trainable_bytes // shard, f"{p.trainable:,} in {_dtype(master)}{sharded}"))
    if p.frozen:
        what = "frozen base" if trains else "weights"
        how = f": {p.nf4:,} in NF4, the rest in {_dtype(compute)}" if p.nf4 else f" in {_dtype(compute)}"
        est.terms.append(Term(what, p.frozen_bytes // shard, f"{p.frozen:,}{how}{sharded}"))
    if trains:
        in_backward = getattr(cfg, "optimizer_in_backward", False)
        grads = (p.largest_trainable if in_backward else p.trainable) * master.itemsize
        note = "one tensor at a time (optimizer_in_backward)" if in_backward else f"{_dtype(master)}{sharded}"
        est.terms.append(Term("gradients", grads // (1 if in_backward else shard), note))
        numels = [q.numel() for q in model.parameters() if q.requires_grad]
        opt, note = optimizer_bytes(cfg.optimizer, numels, master.itemsize)
        est.terms.append(Term("optimizer state", opt // shard, note + sharded))
        if master != compute and shard == 1:  # autocast keeps a compute-dtype copy of each weight that trains
            est.terms.append(Term("autocast weight copies", p.trainable * compute.itemsize,
                                  f"{_dtype(compute)} casts cached for the step"))
    if device_type == "cpu":  # code pages, data and set-up: there from before loading to the end
        est.terms.append(Term("CPU runtime", CPU_RUNTIME, "code pages, data set, tokenizer, set-up (measured, "
                              "BENCHMARKS.md)"))
    if device_type == "cpu" and shard == 1:
        est.loading = _loading_bytes(cfg.model, p.trainable + p.frozen, master if trains and not lora else compute)
        est.loading += CPU_RUNTIME
    if shard > 1:
        biggest_block = max(sum(q.numel() for q in layer.parameters()) for layer in model.layers)
        root = sum(q.numel() for n, q in model.named_parameters() if not n.startswith("layers."))
        est.terms.append(Term("FSDP2 gathered weights", (2 * biggest_block + root) * compute.itemsize,
                              "two blocks (one prefetched) and the unsharded root"))

    for key, label, dtype in _extra_models(cfg, compute, master):
        extra_args = args
        if key != "model":
            extra_args, extra_source = model_args(getattr(cfg, key), key=key)
            est.notes.append(f"{key}: {extra_source}")
        extra = param_bytes(build_meta(extra_args, cfg, adapters=False), master=dtype, compute=dtype,
                            quantize_base=False, trains=False)
        est.params[label] = extra
        est.terms.append(Term(label, extra.frozen_bytes // shard, f"{extra.frozen:,} frozen, {_dtype(dtype)}{sharded}"))

    work = workload(cfg, args.max_seq_len)
    if trains and work.rows and activations:
        padding_free = getattr(cfg, "padding_free", True)
        acts: Activations = measure(model, args, rows=work.rows, seq_len=work.seq_len,  # changes `model`: last
                                    padding_free=padding_free, dtype=compute)
        est.activations = acts
        every = getattr(cfg, "activation_checkpointing_every", 1)
        ckpt = getattr(cfg, "enable_activation_checkpointing", False)
        saved = acts.total(checkpointing=ckpt, every=every)
        other = acts.total(checkpointing=not ckpt, every=every)
        tokens = work.rows * work.seq_len
        packed = (cfg.dataset or {}).get("packed")
        layout = "padding-free" if padding_free else ("packed rows" if packed else "padded rows")
        note = (f"{work.rows} x {work.seq_len} = {tokens:,} tokens per micro-batch ({layout}), "
                f"checkpointing {'on' if ckpt else 'off'}; {'off' if ckpt else 'on'}: {_gib(other)}")
        if acts.approximate:
            note += "; MoE blocks measured as dense"
        host = 0
        if getattr(cfg, "enable_activation_offloading", False) and device_type == "cuda":
            # Offloaded tensors wait in pinned host memory; a few are in flight or prefetched.
            host, saved = saved - max(acts.per_layer, default=0), max(acts.per_layer, default=0)
            note += "; offloaded to host memory"
        est.terms.append(Term("activations", saved, note, host_bytes=host))
        # While a block's backward runs, the gradients of what it saved exist beside the rest
        # (measured on the CPU: +1 block per micro-batch row on the tiny Llama, BENCHMARKS.md).
        est.terms.append(Term("backward buffers", max(acts.per_layer, default=0),
                              "gradients of one block's saved tensors during its backward"))
        # An adapted head is not a plain linear map: its chunks are recomputed, no fp32 head gradient.
        est.terms.append(Term("logits / loss chunks", loss_bytes(args, tokens=tokens, chunk_size=cfg.loss_chunk_size,
                                                                  dtype=compute, head_trains=not lora),
                              f"chunks of {min(cfg.loss_chunk_size, tokens):,} tokens x {args.vocab_size:,} "
                              "vocabulary"))
        est.notes.append(f"tokens per micro-batch: {work.rows} rows x {work.seq_len} (the longest a row may "
                         "be; padding-free batches and shorter rows take less)")
    if work.kv_rows:
        est.terms.append(Term("KV cache", kv_cache_bytes(args, rows=work.kv_rows, length=work.kv_len, dtype=compute),
                              f"{work.kv_rows} sequences x {work.kv_len:,} positions, {_dtype(compute)}"))
    return est


def _loading_bytes(model_cfg: dict[str, Any], numel: int, dtype: torch.dtype) -> int:
    """Host memory while one process reads its checkpoint (`models/pretrained.py`): every
    weight in the load dtype, and the safetensors file's pages mapped while it is read (the
    files in `model.path`; a model not downloaded yet: bf16, as hub checkpoints mostly are).
    Transforms (NF4, LoRA's master copies) run after the file is closed."""
    from pathlib import Path

    path = model_cfg.get("path")
    files = sorted(Path(path).glob("*.safetensors")) if path and Path(path).is_dir() else []
    stored = sum(f.stat().st_size for f in files) if files else 2 * numel
    return numel * dtype.itemsize + stored


def _extra_models(cfg: Any, compute: torch.dtype, master: torch.dtype) -> list[tuple[str, str, torch.dtype]]:
    """(config key of the model, term name, dtype) of the frozen models a recipe keeps besides
    the one it trains: DPO's reference copy, GRPO's reference, a distillation teacher."""
    from tunewright.models.pretrained import as_dtype

    lora = getattr(cfg, "lora_rank", None) is not None
    if cfg.recipe == "dpo" and not lora and cfg.loss not in REFERENCE_FREE and not cfg.precompute_ref_logps:
        return [("model", "reference model", compute)]
    if cfg.recipe == "grpo" and not lora and cfg.beta > 0:
        return [("model", "reference model", master)]
    if cfg.recipe == "knowledge_distillation":
        return [("teacher_model", "teacher model", as_dtype(cfg.teacher_dtype or cfg.dtype))]
    return []


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _gib(num_bytes: int) -> str:
    from tunewright.training.estimate.devices import human

    return human(num_bytes)


def with_changes(cfg: Any, **changes: Any) -> Any:
    """A copy of the Config with these keys changed (a candidate fix)."""
    return dataclasses.replace(cfg, **changes)
