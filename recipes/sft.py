"""Supervised fine-tuning: next-token cross-entropy on the target tokens of every row.

    tune run sft --config llama/tiny_full                         # every weight trains
    tune run sft --config llama/tiny_lora                         # LoRA / DoRA / QLoRA adapters
    tune run --nproc_per_node 8 sft --config llama3_1/8B_full_distributed    # FSDP2 (+ TP)

torchtune's recipe names (`full_finetune_single_device`, `lora_finetune_single_device`,
`full_finetune_distributed`, `lora_finetune_distributed`) run this file too. `lora_rank` set
trains adapters, unset trains every weight; under torchrun (or with `distributed: true`) the
model is sharded with FSDP2.

The file is the algorithm, top to bottom: set-up, model, data, the loop (forward, loss,
backward, optimizer step, logging, evaluation, checkpoints), export. Every mechanical line is
one call into `tunewright.training`. Copy it (`tune cp sft my_sft.py`, then
`tune run my_sft.py --config ...`) to change the loss, log a metric, add a model or a phase:
see the README's "Change the algorithm".

Quantization-aware training is this recipe with a `quantization:` node (`tune run qat` and
torchtune's QAT recipe names run it too): right after loading, every linear layer (and the
embeddings, with `quantization.embeddings`) computes with its weights, and for the dynamic
schemes its activations, rounded to the target format and back (torchao's fake quantization,
`training/quantize.py`); `fake_quant_after_n_steps: N` trains the first N steps without
rounding; at the end the model is quantized for real into `quantized/` (torchao's tensors,
loadable by `generate`/`evaluate`) and `dequantized/` (Hugging Face format). Full or LoRA (an
adapted layer fake-quantizes its merged weight W + s*BA, the weight that is deployed), one
device or FSDP2; a QLoRA NF4 base and tensor parallelism are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from tunewright.training.entry import recipe_main
from tunewright.training.gguf_export import GGUFOutType, gguf_export_step
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import Range
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    # Step each weight as soon as its gradient is ready and free that gradient: full gradients
    # never exist at once. Needs gradient_accumulation_steps: 1 and clip_grad_norm: null.
    optimizer_in_backward: bool = False
    # Also write the final model (LoRA: merged) as a GGUF file for llama.cpp / Ollama, beside it:
    # f32 | f16 | bf16 | q8_0 (training/gguf_export.py); null: no GGUF.
    export_gguf: GGUFOutType | None = None
    # Quantization-aware training: {scheme: int8_dynamic_act_int4_weight | int4_weight_only |
    # int4_weight_only_cuda | float8_dynamic_act_float8_weight | float8_dynamic_act_int4_weight,
    # group_size: 32, embeddings: false} (training/quantize.py); null: plain training.
    quantization: dict[str, Any] | None = None
    # QAT: the first N steps train without fake quantization (torchtune's key); null: from step 1.
    fake_quant_after_n_steps: Annotated[int, Range(ge=0, hint="null: from the first step")] | None = None


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    from functools import partial

    import torch

    from tunewright.training.batching import StepBatches, global_sum, target_count, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.objectives import causal_lm_loss, evaluate_loss
    from tunewright.training.offload import activation_offloading
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.optim_in_backward import check_optimizer_in_backward
    from tunewright.training.placement import Placement
    from tunewright.training.quantize import export_qat, prepare_qat, qat_from_config, set_fake_quant
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    if cfg.optimizer_in_backward:
        check_optimizer_in_backward(cfg)
    qat = qat_from_config(cfg)  # the `quantization:` node (quantization-aware training) or None
    seed_everything(cfg.seed)
    export_gguf = gguf_export_step(cfg)  # checked now: a model llama.cpp cannot hold fails before training
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device
        if qat:
            qat.check_device(device)  # GPU-only schemes: one line elsewhere

        # -------------------------------------------------------------- data (before the model: a
        # bad file or column fails in seconds, not after minutes of loading weights)
        _, train, val = build_data(cfg)
        data = StepBatches.from_config(train, cfg)  # the micro-batches of each step, epoch by epoch

        # -------------------------------------------------------------- model (+ LoRA adapters, QAT)
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base,
                                 convert=partial(prepare_qat, node=qat) if qat else None)
        write_adapter = lora and peft_adapter_ok(model, cfg)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model, in_backward=cfg.optimizer_in_backward)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        loss_fn = partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size, padding_free=cfg.padding_free)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            if qat:  # from the step number, so a resumed run switches where the uninterrupted one did
                set_fake_quant(model, step > (cfg.fake_quant_after_n_steps or 0))
            micro_batches = data.next()
            num_targets = target_count(micro_batches, device=device)  # this step's, on every rank
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for batch in micro_batches:
                with activation_offloading(cfg.enable_activation_offloading):
                    loss, _ = loss_fn(model, to_device(batch, device))  # summed over the targets
                (loss / num_targets).backward()
                loss_sum += loss.detach()
                del loss  # its spent graph, alive into the next forward, raised peak RSS by 12%
            # A NaN or infinite loss or gradient: stop, or skip the update (on_nonfinite).
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=loss_sum, run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                run.log(loss=global_sum(loss_sum) / num_targets, lr=lr, grad_norm=grad_norm,
                        epoch=data.epoch, num_targets=num_targets.long(),
                        **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                held_out = evaluate_loss(model, val, loss_fn, device=device, max_batches=cfg.max_eval_batches)
                run.log(val_loss=held_out.loss)
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        if qat:  # adapter/, quantized/ (torchao's), dequantized/ (Hugging Face format)
            export_qat(place, model, qat, run, cfg, write_adapter=write_adapter)
        else:
            place.save_results(model, run, cfg, write_adapter=write_adapter)  # adapter/, final/ or merged/
        export_gguf(place, model, run)  # export_gguf: final/ or merged/ as <dir>-<type>.gguf
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
