"""On-policy distillation: the student writes the replies, the teacher grades every token.

    tune run on_policy_distillation --config llama/tiny_on_policy_distill       # seconds, offline
    tune run on_policy_distillation --config llama/tiny_on_policy_distill lmbda=0.5 kd_loss=generalized_jsd

Each step takes the SFT data's rows, keeps each row's prompt (its tokens before the first
target) and has the student sample a reply to it (`training/rollout.py`: batched, KV cache, at
`temperature`); both models then read prompt + reply, and the loss is the per-token divergence
of the student from the teacher on the sampled tokens (default `reverse_kl`, the mode-seeking
KL of on-policy distillation), summed over the step's sampled tokens and divided by their
number. With `lmbda` < 1 (GKD's on-policy fraction, Agarwal et al. 2024) a step samples with
probability `lmbda` and otherwise uses the dataset's replies, as `knowledge_distillation` with
kd_ratio 1 does. There is no cross-entropy term (a student's own samples are no target);
`ce_loss` logs the student's negative log-likelihood of the tokens it learnt from.

Teacher, divergences, precision, LoRA or full student: as `knowledge_distillation`. The draws
(which steps sample, and the samples) come from generators saved in each checkpoint, so a
resumed run samples what the uninterrupted one would have. FSDP2 runs as one process
(`distributed: true`); several processes sample replies of different lengths, which the
rollout engine does not yet keep in step across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from tunewright.training.distill_config import DistillConfig
from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import PositiveInt, Range
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig, DistillConfig):
    kd_loss: Literal["forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd"] = "reverse_kl"
    lmbda: Annotated[float, Range(ge=0, le=1)] = 1.0  # fraction of steps whose replies the student samples
    max_new_tokens: PositiveInt = 128  # longest sampled reply; sampling temperature is `temperature`


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    from functools import partial

    import torch

    from tunewright.models.pretrained import as_dtype
    from tunewright.training import distributed as dist
    from tunewright.training.batching import StepBatches, global_sum, target_count, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.distill import (check_same_vocabulary, distillation_loss, evaluate_distillation,
                                             prompts_of)
    from tunewright.training.grpo import rollout_batch
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.rollout import SamplingGenerator, rollout
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data (prompts and replies) and the
        # teacher's vocabulary against the student's (both before any weight loads)
        tokenizer, train, val = build_data(cfg)
        check_same_vocabulary(cfg.model, cfg.teacher_model)
        data = StepBatches(train, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                           epochs=cfg.epochs, max_steps_per_epoch=cfg.max_steps_per_epoch,
                           max_steps=cfg.max_steps)
        choice = SamplingGenerator(cfg.seed)  # which steps sample: the same draw on every rank
        sampling = SamplingGenerator(cfg.seed + dist.rank(), device)  # the samples: each rank its own

        # -------------------------------------------------------------- student (+ LoRA) and teacher
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        teacher = place.load_model(cfg.teacher_model, frozen_dtype=as_dtype(cfg.teacher_dtype or cfg.dtype))
        loss_fn = partial(distillation_loss, model, teacher, kd_ratio=1.0, kind=cfg.kd_loss, beta=cfg.beta,
                          temperature=cfg.temperature, chunk_size=cfg.loss_chunk_size, padding_free=cfg.padding_free)

        def student_replies(batch: dict) -> dict:
            """The batch's prompts with replies the student samples now, the replies as targets."""
            out = rollout(model, prompts_of(batch), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          stop_ids=tokenizer.stop_ids, generator=sampling.generator, pad_id=tokenizer.pad_id,
                          vocab_size=tokenizer.vocab_size)
            return rollout_batch(out.prompts, out.completions)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data, choice=choice,
                           sampling=sampling)
        run.resume(state)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            micro_batches = data.next()
            on_policy = float(torch.rand((), generator=choice.generator)) < cfg.lmbda
            if on_policy:  # the student's replies replace the dataset's
                micro_batches = [student_replies(batch) for batch in micro_batches]
            num_targets = target_count(micro_batches, device=device)  # this step's tokens learnt from, every rank
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd over the step
            for batch in micro_batches:
                out = loss_fn(to_device(batch, device))  # the divergence summed over the reply tokens
                (out.loss / num_targets).backward()
                sums += torch.stack([out.loss.detach(), out.ce, out.kd]).double()
                del out  # its spent graph, alive into the next forward, raises peak memory
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=sums[0], run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                loss, ce, kd = global_sum(sums) / num_targets
                num_rows = global_sum(torch.tensor(float(sum(b.get("num_rows", b["labels"].shape[0]) for b in micro_batches)),
                                                  device=device))
                run.log(loss=loss, ce_loss=ce, kd_loss=kd, on_policy=int(on_policy), lr=lr, grad_norm=grad_norm,
                        reply_length=num_targets / num_rows, epoch=data.epoch, num_targets=num_targets.long(),
                        **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):  # on the dataset's replies
                run.log(**evaluate_distillation(model, val, loss_fn, device=device, max_batches=cfg.max_eval_batches))
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)  # adapter/, final/ or merged/
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
