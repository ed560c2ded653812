"""Knowledge distillation: the student learns the teacher's next-token distribution on the SFT
data's replies, mixed with the plain SFT cross-entropy.

    tune run knowledge_distillation --config llama/tiny_kd                       # seconds, offline
    tune run knowledge_distillation --config smollm2/360M_to_135M_kd_lora_single_device
    tune run knowledge_distillation --config llama/tiny_kd kd_loss=reverse_kl kd_ratio=1.0

Per step, summed over the step's target tokens and divided by their number (as `sft` does):

    loss = (1 - kd_ratio) * cross-entropy + kd_ratio * divergence(student || teacher)

`kd_loss` picks the divergence (`training/distill.py`): forward_kl, reverse_kl, symmetric_kl,
generalized_jsd (GKD's, with `beta`), on both models' softmax at `temperature`; every one is 0
when the student is the teacher (torchtune's "forward KL" was the cross-entropy to the teacher,
which is the teacher's entropy there). Both are computed chunk by chunk from the two models'
hidden states: no [tokens, vocab] logits of either model exist whole. The teacher is frozen, in
eval mode, stored and computed in `teacher_dtype`; a teacher of another vocabulary is refused
before anything loads. Full or LoRA student (`lora_rank`), one device or FSDP2 (the teacher is
sharded like the student). torchtune's names `knowledge_distillation_single_device` and
`knowledge_distillation_distributed` run this file. Not done: a teacher's top-k logits cached
to disk for later epochs (the teacher runs at every step). On-policy distillation, where the
student writes the replies, is `recipes/on_policy_distillation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from tunewright.training.distill_config import DistillConfig
from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import Range
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig, DistillConfig):
    kd_ratio: Annotated[float, Range(ge=0, le=1)] = 0.5  # weight of the divergence; 1 - kd_ratio on the cross-entropy


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    from functools import partial

    import torch

    from tunewright.models.pretrained import as_dtype
    from tunewright.training.batching import StepBatches, global_sum, target_count, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.distill import check_same_vocabulary, distillation_loss, evaluate_distillation
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data, and the teacher's
        # vocabulary against the student's (both before any weight loads)
        _, train, val = build_data(cfg)
        check_same_vocabulary(cfg.model, cfg.teacher_model)
        data = StepBatches(train, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                           epochs=cfg.epochs, max_steps_per_epoch=cfg.max_steps_per_epoch,
                           max_steps=cfg.max_steps)

        # -------------------------------------------------------------- student (+ LoRA) and teacher
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        teacher = place.load_model(cfg.teacher_model, frozen_dtype=as_dtype(cfg.teacher_dtype or cfg.dtype))
        loss_fn = partial(distillation_loss, model, teacher, kd_ratio=cfg.kd_ratio, kind=cfg.kd_loss, beta=cfg.beta,
                          temperature=cfg.temperature, chunk_size=cfg.loss_chunk_size, padding_free=cfg.padding_free)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            micro_batches = data.next()
            num_targets = target_count(micro_batches, device=device)  # this step's, on every rank
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd over the step
            for batch in micro_batches:
                out = loss_fn(to_device(batch, device))  # each term summed over the targets
                (out.loss / num_targets).backward()
                sums += torch.stack([out.loss.detach(), out.ce, out.kd]).double()
                del out  # its spent graph, alive into the next forward, raises peak memory
            # A NaN or infinite loss or gradient: stop, or skip the update (on_nonfinite).
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=sums[0], run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                loss, ce, kd = global_sum(sums) / num_targets
                run.log(loss=loss, ce_loss=ce, kd_loss=kd, lr=lr, grad_norm=grad_norm, epoch=data.epoch,
                        num_targets=num_targets.long(), **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                run.log(**evaluate_distillation(model, val, loss_fn, device=device, max_batches=cfg.max_eval_batches))
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)  # adapter/, final/ or merged/
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
