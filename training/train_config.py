"""The top-level keys every training recipe accepts (torchtune's names where it has one).

A recipe's schema subclasses `TrainConfig` and adds only the keys that are new about its
objective; `training/schema.py` rejects anything else. Every number carries its range
(`PositiveInt`, `Range`), checked with the types before any work: 0 or a negative count is an
error, never "no limit" (null is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tunewright.training.schema import Matches, PositiveInt, Range, component, needs

# torch.device strings a recipe can run on; `auto` takes a GPU when there is one.
Device = Annotated[str, Matches(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", "cpu, cuda, cuda:N, mps, xpu or auto")]
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]


@dataclass(kw_only=True)
class RunConfig:
    """Keys of every recipe that loads a model and data: training, evaluation."""

    recipe: str
    output_dir: str
    model: dict[str, Any] = component(required=True)  # e.g. tunewright.models.load_pretrained
    tokenizer: dict[str, Any] = component(required=True)
    dataset: dict[str, Any] = component(supplied=("tokenizer",), required=True)
    seed: Seed = 0
    device: Device = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: PositiveInt | None = None  # torch.set_num_threads; None keeps torch's default
    batch_size: PositiveInt = 2
    loss_chunk_size: PositiveInt = 1024  # tokens per chunk of the output head + cross-entropy


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    # Held-out split for the validation loss (e.g. the same source with split: train[95%:]).
    val_dataset: dict[str, Any] | None = component(supplied=("tokenizer",))
    optimizer: dict[str, Any] = component(supplied=("params",), required=True)
    lr_scheduler: dict[str, Any] | None = component(supplied=("optimizer", "num_training_steps"))
    metric_logger: dict[str, Any] | None = component(supplied=("output_dir",))

    shuffle: bool = True
    group_by_length: bool = False
    gradient_accumulation_steps: PositiveInt = 1
    epochs: PositiveInt = 1
    max_steps_per_epoch: Annotated[int, Range(ge=1, hint="null: no limit")] | None = None
    max_steps: Annotated[int, Range(ge=1, hint="null: no limit")] | None = None
    clip_grad_norm: Annotated[float, Range(gt=0, hint="null: no clipping")] | None = 1.0
    # Compute only real tokens: rows are laid end to end with per-row causal attention
    # (training/unpad.py). Same loss as the padded batch; false computes the padding too.
    # The flat batch is made on the host as rows are collated, so a step reads nothing back.
    padding_free: bool = True
    # Batches are collated by `num_workers` DataLoader processes ahead of the step (null: 2 on
    # CUDA, 0 elsewhere, where collating in the loop's thread costs less than the processes),
    # into page-locked memory with `pin_memory` (null: on CUDA) for asynchronous copies to the
    # GPU. Same batches, same order, same resume point either way.
    num_workers: Annotated[int, Range(ge=0, hint="null: 2 on CUDA, 0 otherwise")] | None = None
    pin_memory: bool | None = None

    # Weights that train, their gradients and the optimizer state are kept in master_dtype
    # while the model computes in `dtype` (training/precision.py): fp32 with dtype: bf16 is
    # mixed precision; bf16 is pure bf16 training (torchtune's bf16: half the memory of those
    # weights, but updates below 2^-8 of a weight are lost). Frozen weights stay in `dtype`.
    master_dtype: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = True  # fp32 matmuls on NVIDIA GPUs in TF32 (no effect on CPU or in bf16)
    # Deterministic kernels: bit-exact resume on GPUs too (CPU runs are deterministic anyway),
    # at some speed (training/setup.py set_deterministic).
    deterministic: bool = False

    compile: bool = False
    enable_activation_checkpointing: bool = False
    activation_checkpointing_every: PositiveInt = 1  # with enable_activation_checkpointing: every k-th block
    # Tensors saved for backward wait in pinned CPU memory (CUDA; a no-op on CPU): offload.py
    enable_activation_offloading: bool = False

    log_every_n_steps: PositiveInt = 1
    eval_every_n_steps: Annotated[int, Range(ge=1, hint="null: no validation")] | None = None
    max_eval_batches: Annotated[int, Range(ge=1, hint="null: the whole set")] | None = None
    save_every_n_steps: Annotated[int, Range(ge=1, hint="null: no step checkpoints")] | None = None
    keep_last_n_checkpoints: Annotated[int, Range(ge=1, hint="null: keep all")] | None = 2
    resume_from_checkpoint: bool | str = False  # false | true/auto (latest) | a step directory
    # The fine-tuned model in Hugging Face format: <output_dir>/final, or with LoRA the model
    # with its adapters merged in, <output_dir>/merged. null: true for full fine-tuning, false
    # with LoRA (the adapter is the result; a merged 70B model is 140 GB).
    save_final_model: bool | None = None
    progress_bar: bool = True

    # Reliability (README "Reliability"). A step whose loss or gradient norm is NaN or infinite:
    # `stop` ends the run before updating (every finite checkpoint kept, nothing exported);
    # `skip` drops that step's update and goes on, stopping after `max_nonfinite_steps` skips.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_steps: PositiveInt = 10
    # An output_dir holding an earlier run: start over, deleting that run's checkpoints,
    # metrics.jsonl and exports (without it, and without resume, the run refuses to start).
    overwrite_output_dir: bool = False


@dataclass(kw_only=True)
class LoRAConfig:
    """The adapter keys of training recipes: `lora_rank` set trains LoRA adapters (only they
    train), null trains every weight; the other keys need it."""

    lora_rank: Annotated[int, Range(ge=1, hint="null: full fine-tuning")] | None = None
    lora_targets: list[str] | str = needs("lora_rank", "all-linear")  # q, k, v, o, gate, up, down, output
    lora_alpha: Annotated[float, Range(gt=0)] = needs("lora_rank", 16.0)
    lora_dropout: Annotated[float, Range(ge=0, lt=1)] = needs("lora_rank", 0.0)
    use_rslora: bool = needs("lora_rank", False)
    use_dora: bool = needs("lora_rank", False)
    # gate/up/down of a mixture-of-experts layer: an adapter per expert, one shared, or none
    lora_experts: Literal["per_expert", "shared"] | None = needs("lora_rank", "per_expert")
    quantize_base: bool = needs("lora_rank", False)  # QLoRA: frozen base weights of adapted layers in NF4
    # PEFT's names: true starts B = 0; loftq picks the NF4 base and A, B together so that base + BA
    # is close to the checkpoint's W (modules/peft/loftq.py), `loftq_iter` alternations.
    init_lora_weights: Literal[True, "loftq"] = needs("lora_rank", True)
    loftq_iter: PositiveInt = needs("lora_rank", 1)
    save_adapter: bool = needs("lora_rank", True)  # the PEFT adapter in <output_dir>/adapter
