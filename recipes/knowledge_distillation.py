"""Knowledge distillation: the student learns a frozen teacher's next-token distribution, on the
SFT data's replies (mixed with the SFT cross-entropy) or on replies it samples itself
(on-policy distillation: the student writes, the teacher grades every token).

    tune run knowledge_distillation --config llama/tiny_kd                       # seconds, offline
    tune run knowledge_distillation --config llama/tiny_kd kd_loss=reverse_kl kd_ratio=1.0
    tune run knowledge_distillation --config llama/tiny_on_policy_distill        # on-policy
    tune run knowledge_distillation --config smollm2/360M_to_135M_kd_lora_single_device

Per step, summed over the step's target tokens and divided by their number (as `sft` does):

    loss = (1 - kd_ratio) * cross-entropy + kd_ratio * divergence(student, teacher)

`kd_loss` picks the divergence (`training/distill.py`): forward_kl, reverse_kl, symmetric_kl,
generalized_jsd (GKD's, with `beta`), on both models' softmax at `temperature`; every one is 0
when the student is the teacher (torchtune's "forward KL" was the cross-entropy to the teacher,
which is the teacher's entropy there). Both models run to their hidden states and the heads and
the divergence go chunk by chunk: no [tokens, vocab] logits of either model exist whole.

On-policy (`lmbda` > 0, GKD's on-policy fraction, Agarwal et al. 2024): a step samples with
probability `lmbda`; it then keeps each row's prompt (its tokens before the first target), has
the student sample a reply (`training/rollout.py`, at `temperature`, up to `max_new_tokens`),
and learns the divergence alone over the sampled tokens (a student's own sample is no target
for a cross-entropy; `ce_loss` logs its negative log-likelihood). reverse_kl is the usual
divergence there. Which steps sample, and the samples, come from generators saved in each
checkpoint, so a resumed run samples what the uninterrupted one would have.

The teacher is frozen, in eval mode, stored and computed in `teacher_dtype`; a teacher of
another vocabulary is refused before anything loads. Full or LoRA student (`lora_rank`), one
device or FSDP2 (the teacher sharded like the student; on a sampled step every process samples
its own rows, and the rollout keeps the processes' decode steps in step). torchtune's names
`knowledge_distillation_single_device` and `knowledge_distillation_distributed` run this file.
With `teacher_top_k: K` the teacher's top-K log-probabilities at each target token are cached
on disk (`teacher_cache_dir`, default <output_dir>/teacher_cache) as epoch 1 computes them, and
later epochs read them instead of running the teacher (`training/teacher_cache.py`: the
divergence over the K ids plus one outcome for the rest; on-policy steps still run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import PositiveInt, Range, component
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    # A frozen model of the same tokenizer (another size of the family): config.json's
    # vocab_size and tokenizer.json must match the student's, checked before any weight loads.
    teacher_model: dict[str, Any] = component(required=True)
    teacher_dtype: Literal["fp32", "bf16"] | None = None  # the teacher's storage and compute; null: `dtype`
    kd_loss: Literal["forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd"] = "forward_kl"
    beta: Annotated[float, Range(ge=0, le=1)] = 0.5  # generalized_jsd: 0 is forward KL, 1 reverse KL
    temperature: Annotated[float, Range(gt=0)] = 1.0  # both softmaxes of the divergence; on-policy sampling
    kd_ratio: Annotated[float, Range(ge=0, le=1)] = 0.5  # the divergence's weight on the dataset's replies
    lmbda: Annotated[float, Range(ge=0, le=1)] = 0.0  # fraction of steps on replies the student samples
    max_new_tokens: PositiveInt = 128  # the longest sampled reply
    teacher_top_k: PositiveInt | None = None  # cache the teacher's top-k per target for later epochs; null: no cache
    teacher_cache_dir: str | None = None  # null: <output_dir>/teacher_cache


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
    from tunewright.training.teacher_cache import open_teacher_cache

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data, and the teacher's
        # vocabulary against the student's (both before any weight loads)
        tokenizer, train, val = build_data(cfg)
        check_same_vocabulary(cfg.model, cfg.teacher_model)
        cache, train = open_teacher_cache(cfg, train, run.output_dir)  # batches then carry example ids
        data = StepBatches.from_config(train, cfg)  # the micro-batches of each step, epoch by epoch
        choice = SamplingGenerator(cfg.seed)  # which steps sample: the same draws on every rank
        sampling = SamplingGenerator(cfg.seed + dist.rank(), device)  # the samples: each rank its own

        # -------------------------------------------------------------- student (+ LoRA) and teacher
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        teacher = place.load_model(cfg.teacher_model, frozen_dtype=as_dtype(cfg.teacher_dtype or cfg.dtype))
        loss_fn = partial(distillation_loss, model, teacher, kind=cfg.kd_loss, beta=cfg.beta,
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
            if on_policy:  # the student's replies replace the dataset's, and the divergence alone counts
                micro_batches = [student_replies(batch) for batch in micro_batches]
            kd_ratio = 1.0 if on_policy else cfg.kd_ratio
            num_targets = target_count(micro_batches, device=device)  # this step's, on every rank
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd over the step
            for batch in micro_batches:
                teacher_input = cache.teacher_options(batch, device) if cache else {}  # cached top-k, or a recorder
                out = loss_fn(to_device(batch, device), kd_ratio=kd_ratio, **teacher_input)  # summed over targets
                (out.loss / num_targets).backward()
                sums += torch.stack([out.loss.detach(), out.ce, out.kd]).double()
                del out  # its spent graph, alive into the next forward, raises peak memory
            # A NaN or infinite loss or gradient: stop, or skip the update (on_nonfinite).
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=sums[0], run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                loss, ce, kd = global_sum(sums) / num_targets
                sampled = {}
                if cfg.lmbda:
                    rows = global_sum(torch.tensor(float(sum(b.get("num_rows", len(b["labels"])) for b in micro_batches)),
                                                   device=device))
                    sampled = dict(on_policy=int(on_policy), reply_length=num_targets / rows)
                run.log(loss=loss, ce_loss=ce, kd_loss=kd, **sampled, lr=lr, grad_norm=grad_norm, epoch=data.epoch,
                        num_targets=num_targets.long(), **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):  # on the dataset's replies
                run.log(**evaluate_distillation(model, val, loss_fn, device=device, max_batches=cfg.max_eval_batches))
            if run.due(cfg.save_every_n_steps):
                if cache:  # the rows of the steps the checkpoint holds: a resumed run reads them
                    cache.flush()
                run.save(state, export=export)
        if cache:
            cache.flush()

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)  # adapter/, final/ or merged/
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
