"""Quantization-aware training: supervised fine-tuning through torchao's fake quantization, then
the model quantized for real.

    tune run qat --config llama/tiny_qat                                  # seconds, offline
    tune run qat --config llama3_2/1B_qat_single_device

The model is prepared right after it loads (Placement's `convert` slot: after adapters and NF4,
before activation checkpointing and compile): every linear layer (and the embeddings, with
`quantization.embeddings`) computes with weights, and for the dynamic schemes activations,
rounded to the target format and back (`training/quantize.py`). The loop is `sft`'s: the
cross-entropy of the target tokens, the same batches, optimizer step, logging, held-out loss and
checkpoints. `fake_quant_after_n_steps: N` trains the first N steps without rounding (the
switch is set from the step number, so a resumed run sets it as the uninterrupted one did).
At the end the fake-quantized layers are converted (torchao's `QATConfig(step="convert")`):

    <output_dir>/quantized/     torchao's tensors (safetensors, no pickle) + config + tokenizer:
                                model: {_component_: tunewright.training.quantize.load_quantized}
    <output_dir>/dequantized/   its weights dequantized, in Hugging Face format (computes the
                                same for weight-only schemes; activations are not rounded)
    <output_dir>/final/         the trained weights before rounding (save_final_model, or FSDP2;
                                merged/ with LoRA); adapter/: the LoRA adapter (PEFT format)

Why a recipe of its own rather than a key of sft: the loop is sft's plus two lines (the switch
and the convert-and-save), but sft's loop is its own to edit after `tune cp`, and this file is
what `tune cp qat` gives a user who wants to change what QAT does (the price: the loop's dozen
mechanical lines are sft's again). One device or FSDP2 (`tune run --nproc_per_node N qat ...`;
tensor parallel is refused, as a row-sharded weight would split its quantization groups), full
or LoRA: an adapted layer fake-quantizes its merged weight W + s·BA, the weight that is deployed
(training/quantize.py says why); a QLoRA NF4 base is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import Range
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    # {scheme: int8_dynamic_act_int4_weight | int4_weight_only | int4_weight_only_cuda |
    #  float8_dynamic_act_float8_weight | float8_dynamic_act_int4_weight, group_size: 32,
    #  embeddings: false}: training/quantize.py
    quantization: dict[str, Any]
    # The first N steps train without fake quantization (torchtune's key); null: from step 1.
    fake_quant_after_n_steps: Annotated[int, Range(ge=0, hint="null: from the first step")] | None = None


def main(cfg: Config) -> list[dict]:
    from functools import partial

    import torch

    from tunewright.training.batching import StepBatches, global_sum, target_count, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.objectives import causal_lm_loss, evaluate_loss
    from tunewright.training.offload import activation_offloading
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.quantize import Quantization, export_qat, prepare_qat, set_fake_quant
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    quantization = Quantization.from_node(cfg.quantization)
    if cfg.tensor_parallel_dim > 1:  # a row-sharded weight would split its quantization groups
        raise ValueError("tensor_parallel_dim: QAT shards with FSDP2 only for now; set tensor_parallel_dim: 1")
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        quantization.check_device(place.device)
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data
        _, train, val = build_data(cfg)
        data = StepBatches.from_config(train, cfg)  # the micro-batches of each step, epoch by epoch

        # -------------------------------------------------------------- model, fake-quantized
        lora = cfg.lora_rank is not None
        if lora and cfg.quantize_base:
            raise ValueError("quantize_base: QAT on a QLoRA NF4 base is not possible: fake quantization needs "
                             "the full-precision base weights; set quantize_base: false")
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 convert=partial(prepare_qat, node=quantization))
        write_adapter = lora and peft_adapter_ok(model, cfg)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        loss_fn = partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size, padding_free=cfg.padding_free)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop (sft's)
        model.train()
        for step in run.steps(data.total_steps):
            set_fake_quant(model, step > (cfg.fake_quant_after_n_steps or 0))
            micro_batches = data.next()
            num_targets = target_count(micro_batches, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for batch in micro_batches:
                with activation_offloading(cfg.enable_activation_offloading):
                    loss, _ = loss_fn(model, to_device(batch, device))  # summed over the targets
                (loss / num_targets).backward()
                loss_sum += loss.detach()
                del loss
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

        # -------------------------------------------------------------- convert, export: quantized/, dequantized/
        if write_adapter and cfg.save_adapter:
            place.save_adapter(model, run.output_dir / "adapter")  # trained through the rounding
        export_qat(place, model, quantization, run.output_dir, source_dir=cfg.model.get("path"),
                   save_final=bool(cfg.save_final_model))
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
