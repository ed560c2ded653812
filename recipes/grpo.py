"""Online RL with verifiable rewards: GRPO and its successors (Dr. GRPO, DAPO, GSPO).

    tune run grpo --config llama/tiny_grpo                                  # seconds, offline
    tune run grpo --config smollm2/135M_grpo_lora_single_device             # reasoning-gym arithmetic
    tune run grpo --config llama/tiny_grpo loss_type=grpo importance_sampling_level=sequence

Each step: take batch_size / num_generations prompts, sample num_generations completions of
each with the model being trained (`training/rollout.py`: its own model code, in place, so the
sampling log-probs are the training forward's and the first importance ratio is 1), score them
with the reward functions (`training/rewards.py`), normalise the rewards within each prompt's
group into advantages, then `ppo_epochs` passes over the completions in `num_minibatches`
optimizer steps of the clipped objective (`training/grpo.py`, TRL's option names: loss_type,
importance_sampling_level, epsilon, epsilon_high, beta, scale_rewards,
mask_truncated_completions). `dynamic_sampling` (DAPO) leaves groups whose completions all got
the same reward out of the step (they carry no signal, but would count in its normalisers).

With beta > 0 a KL penalty holds the policy near a reference: with LoRA the same model with
its adapters disabled (no copy), with full fine-tuning a frozen copy. The sampling generator is
part of each checkpoint, so a resumed run samples what the uninterrupted one would have.
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
    # batch_size (of TrainConfig) counts completions per step and process: batch_size /
    # num_generations prompts, num_generations completions each.
    rewards: dict[str, Any] = component(required=True)  # a tunewright.training.rewards.RewardSet
    num_generations: Annotated[int, Range(ge=2)] = 8  # G, completions per prompt (a group)
    max_new_tokens: PositiveInt = 256  # TRL's max_completion_length
    temperature: Annotated[float, Range(gt=0)] = 1.0
    top_k: PositiveInt | None = None
    top_p: Annotated[float, Range(gt=0, le=1)] | None = None
    ppo_epochs: PositiveInt = 1  # passes over each rollout (TRL's num_iterations)
    num_minibatches: PositiveInt = 1  # optimizer steps per pass
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    epsilon: Annotated[float, Range(gt=0, lt=1)] = 0.2
    epsilon_high: Annotated[float, Range(gt=0)] | None = None  # null: epsilon; DAPO's clip-higher 0.28
    beta: Annotated[float, Range(ge=0)] = 0.0  # weight of the k3 KL to the reference
    # std of each group, of this process's batch, or none (Dr. GRPO); groups never span processes
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    # With dynamic_sampling: up to N rounds of fresh prompts (DAPO's resampling, verl's
    # max_num_gen_batches) replace the groups whose rewards are all equal; 0: only leave them out.
    max_resample_rounds: Annotated[int, Range(ge=0)] = 0
    # The training forward computes each group's prompt once, its completions attending to it
    # (the same numbers; P + G*C tokens instead of G*(P + C)); models with sliding windows or
    # chunked attention compute each row whole whatever this says.
    share_prompt_forward: bool = True


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    import dataclasses
    import time
    from functools import partial

    import torch

    from tunewright.training import distributed as dist
    from tunewright.training.batching import StepBatches, global_sum
    from tunewright.training.data_setup import build_data
    from tunewright.training.estimate import announce_for_prompts
    from tunewright.training.grpo import (check_grpo_config, completion_logprobs, completion_mask, group_advantages,
                                          micro_batches, padded, policy_loss, refill_groups, resample_pool, rollout_batch, rollout_metrics,
                                          shared_prompt_batch, shares_prompts, zero_variance_groups)
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.ppo_models import ratio_error, reference_logprobs, rollout_batches
    from tunewright.training.preference import MetricSums
    from tunewright.training.rewards import evaluate_rewards, reward_metrics, score_rollouts
    from tunewright.training.rollout import SamplingGenerator, rollout
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    check_grpo_config(cfg)
    seed_everything(cfg.seed)
    G = cfg.num_generations
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer(), announce=False)
        device = place.device

        # -------------------------------------------------------------- prompts and rewards
        tokenizer, train, val = build_data(dataclasses.replace(cfg, batch_size=cfg.batch_size // G))
        announce_for_prompts(cfg, train.dataset)  # the memory estimate, for these prompts' lengths
        data = StepBatches(train, epochs=cfg.epochs, max_steps_per_epoch=cfg.max_steps_per_epoch,
                           max_steps=cfg.max_steps)
        rewards = instantiate(cfg.rewards)
        sampling = SamplingGenerator(cfg.seed + dist.data_rank(), device)  # each data rank its own samples
        pool = resample_pool(train, cfg.seed + 1) if cfg.dynamic_sampling and cfg.max_resample_rounds else None

        # -------------------------------------------------------------- policy and reference
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        make_batch = shared_prompt_batch if cfg.share_prompt_forward and shares_prompts(model) else rollout_batch
        logp_options = dict(chunk_size=cfg.loss_chunk_size, temperature=cfg.temperature)
        reference = None  # with LoRA: the policy with its adapters disabled
        if cfg.beta and not lora:
            reference = place.load_model(cfg.model).requires_grad_(False).eval()

        # -------------------------------------------------------------- optimizer, schedule, state
        updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer,
                                num_training_steps=data.total_steps * updates_per_step)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data, sampling=sampling,
                           resample_data=pool)
        run.resume(state)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        def draw(source: StepBatches) -> tuple[list, Any, torch.Tensor]:
            """G completions of each of the next prompts, by the policy as it is now, scored."""
            prompts = source.next()[0]
            out = rollout(model, [p["prompt_ids"] for p in prompts], num_generations=G,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          top_p=cfg.top_p, stop_ids=tokenizer.stop_ids, generator=sampling.generator,
                          pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
            return prompts, out, score_rollouts(rewards, prompts, out.completions, tokenizer, num_generations=G)

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            # ---- rollout and rewards (DAPO: fresh prompts for groups of equal rewards)
            started = time.perf_counter()
            prompts, out, per_function = draw(data)
            resampled = 0
            if pool is not None:
                prompts, out, per_function, resampled = refill_groups(
                    prompts, out, per_function, partial(draw, pool), num_generations=G, total=rewards.total,
                    max_rounds=cfg.max_resample_rounds)
            rollout_time = time.perf_counter() - started

            # ---- advantages, and which tokens count
            reward = rewards.total(per_function)
            advantages = group_advantages(reward, G, scale_rewards=cfg.scale_rewards).to(device)
            zero_std = zero_variance_groups(reward, G).repeat_interleave(G).to(device)  # per row
            lengths = torch.tensor([len(c) for c in out.completions], device=device)
            tokens_at = completion_mask(lengths)  # [N, T]: where each row's completion tokens are
            mask = completion_mask(lengths, torch.tensor(out.truncated, device=device),
                                   mask_truncated=cfg.mask_truncated_completions)
            counted = torch.ones_like(zero_std, dtype=torch.float)  # rows in the normalisers
            if cfg.dynamic_sampling:
                counted = (~zero_std).float()
                mask = mask * counted[:, None]
            old_logps = padded(torch.cat(out.logprobs), tokens_at)  # what the rows were sampled with
            pieces = micro_batches(len(out), num_minibatches=cfg.num_minibatches,
                                   accumulation=cfg.gradient_accumulation_steps)
            batches = rollout_batches(out, pieces, device, make_batch=make_batch)
            ref_logps = None
            if cfg.beta:
                ref_logps = torch.zeros_like(old_logps)
                for s in (s for minibatch in pieces for s in minibatch):
                    ref_logps[s] = padded(reference_logprobs(model, reference, batches[(s.start, s.stop)],
                                                             **logp_options), tokens_at[s])

            # ---- ppo_epochs passes of clipped updates over minibatches
            started = time.perf_counter()
            metrics, loss_sum, first_ratio_error = MetricSums(device), torch.zeros((), device=device), None
            for epoch in range(cfg.ppo_epochs):
                for minibatch in pieces:
                    rows = slice(minibatch[0].start, minibatch[-1].stop)
                    counts = global_sum(torch.stack([counted[rows].sum(), mask[rows].sum()]))
                    update_loss = torch.zeros((), device=device)
                    for s in minibatch:
                        logp, entropy, _ = completion_logprobs(model, batches[(s.start, s.stop)], **logp_options)
                        logps = padded(logp, tokens_at[s])
                        loss, values = policy_loss(
                            logps, old_logps[s], advantages[s], mask[s], loss_type=cfg.loss_type,
                            importance_sampling_level=cfg.importance_sampling_level, epsilon=cfg.epsilon,
                            epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                            ref_logps=None if ref_logps is None else ref_logps[s],
                            entropies=padded(entropy, tokens_at[s]), max_completion_length=cfg.max_new_tokens,
                            num_sequences=counts[0].clamp(min=1), num_tokens=counts[1],
                            num_batches=len(minibatch) * dist.data_world_size())
                        loss.backward()
                        if epoch == 0 and minibatch is pieces[0]:
                            # Before any update the ratio is 1: rollout and training compute alike.
                            error = ratio_error(logps, old_logps[s], tokens_at[s])
                            first_ratio_error = error if first_ratio_error is None else \
                                torch.maximum(first_ratio_error, error)
                        update_loss += loss.detach()
                        metrics.add(values)
                        del loss
                    grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                                   lr_scheduler=scheduler, loss=update_loss, run=run)
                    loss_sum += update_loss
            train_time = time.perf_counter() - started

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                num_new = int(lengths.sum())
                run.log(loss=global_sum(loss_sum) / updates_per_step,
                        **reward_metrics(rewards, per_function, device=device),
                        **rollout_metrics(zero_variance_groups(reward, G), lengths, torch.tensor(out.truncated)),
                        **({"resample_rounds": resampled} if pool is not None else {}),
                        **metrics.means(("kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region")),
                        first_ratio_error=first_ratio_error, lr=lr, grad_norm=grad_norm,
                        rollout_time=rollout_time, train_time=train_time,
                        rollout_tokens_per_second=num_new / max(rollout_time, 1e-9), num_tokens=num_new)
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                run.log(**evaluate_rewards(model, val, rewards, tokenizer, max_new_tokens=cfg.max_new_tokens,
                                           device=device, max_batches=cfg.max_eval_batches))
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
