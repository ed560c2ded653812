"""PPO for language models (Ouyang et al. 2022; Huang et al. 2024), with TRL's PPOTrainer names.

    tune run ppo --config llama/tiny_ppo_lora                              # seconds, offline
    tune run ppo --config llama/tiny_ppo_full kl_estimator=k3
    tune run ppo --config smollm2/135M_ppo_lora_single_device              # reasoning-gym arithmetic

Each step: take batch_size prompts, sample one completion of each with the policy as it is now
(`training/rollout.py`: the same model code as training, so the first importance ratio is 1),
score each completion (a reward model's score at its last token, or reward functions of
`training/rewards.py`), less `missing_eos_penalty` when it never stopped. Every completion token
pays -kl_coef * KL to the reference and the last one also gets the score; the value model's
values and GAE (gamma, lam) turn these rewards into advantages (whitened over the step's tokens
on all ranks) and returns. Then `ppo_epochs` passes over the completions, in `num_minibatches`
optimizer steps of

    loss = clipped policy loss (epsilon) + vf_coef * clipped value loss (cliprange_value)

each a mean over the minibatch's completion tokens on all ranks (formulas: `training/ppo.py`).

The models (`training/ppo_models.py`): the policy, LoRA or full; the value model, a decoder with
a one-label score head that trains whole with its own optimizer, started from `value_model` (a
reward model's checkpoint) or by default from the policy's checkpoint with a fresh head; the
reference, the policy with its adapters off (LoRA) or a frozen `ref_model`; the reward model,
frozen. Checkpoints hold the policy, the value model, both optimizers and schedules and the
sampling generator, so a resumed run samples and updates as the uninterrupted one. The export is
the policy's (adapter/, final/ or merged/); the value model is only in the step checkpoints.
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
    # batch_size (of TrainConfig) counts prompts per step and process, one completion each.
    reward_model: dict[str, Any] | None = component()  # a *ForSequenceClassification checkpoint, frozen
    rewards: dict[str, Any] | None = component()  # or reward functions: a tunewright.training.rewards.RewardSet
    value_model: dict[str, Any] | None = component()  # null: the policy's checkpoint with a fresh value head
    value_optimizer: dict[str, Any] | None = component(supplied=("params",))  # null: `optimizer`'s
    ref_model: dict[str, Any] | None = component()  # a frozen reference; null: the policy with LoRA off
    max_new_tokens: PositiveInt = 256  # TRL's response_length
    temperature: Annotated[float, Range(gt=0)] = 0.7
    top_k: PositiveInt | None = None
    top_p: Annotated[float, Range(gt=0, le=1)] | None = None
    ppo_epochs: PositiveInt = 4  # passes over each rollout (TRL's num_ppo_epochs)
    num_minibatches: PositiveInt = 1  # optimizer steps per pass (TRL's num_mini_batches)
    epsilon: Annotated[float, Range(gt=0, lt=1)] = 0.2  # the policy ratio's clip (TRL's cliprange)
    cliprange_value: Annotated[float, Range(gt=0, hint="null: no value clipping")] | None = 0.2
    vf_coef: Annotated[float, Range(ge=0)] = 0.1
    kl_coef: Annotated[float, Range(ge=0)] = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    lam: Annotated[float, Range(ge=0, le=1)] = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: Annotated[float, Range(ge=0)] | None = None  # off the score of a completion that never stopped


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    import time
    from functools import partial

    import torch

    from tunewright.models.pretrained import as_dtype
    from tunewright.training import distributed as dist
    from tunewright.training.batching import StepBatches, global_sum
    from tunewright.training.data_setup import build_data
    from tunewright.training.estimate import announce_for_prompts
    from tunewright.training.grpo import completion_logprobs, completion_mask, micro_batches, padded
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.ppo import (gae, kl_estimate, masked_whiten, missing_stop_penalty, policy_loss,
                                         token_rewards, value_loss)
    from tunewright.training.ppo_models import (check_ppo_config, evaluate_reward_model, ratio_error,
                                                reference_logprobs, reward_model_scores, rollout_batches,
                                                token_values, value_model_config)
    from tunewright.training.preference import MetricSums
    from tunewright.training.rewards import evaluate_rewards, reward_metrics, score_rollouts
    from tunewright.training.rollout import SamplingGenerator, rollout
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    check_ppo_config(cfg)  # before any weight loads
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer(), announce=False)
        device = place.device

        # -------------------------------------------------------------- prompts and the reward
        tokenizer, train, val = build_data(cfg)
        announce_for_prompts(cfg, train.dataset)  # the memory estimate, for these prompts' lengths
        data = StepBatches(train, epochs=cfg.epochs, max_steps_per_epoch=cfg.max_steps_per_epoch,
                           max_steps=cfg.max_steps)
        sampling = SamplingGenerator(cfg.seed + dist.data_rank(), device)  # each data rank its own samples
        frozen = as_dtype(cfg.dtype)
        rewards = instantiate(cfg.rewards) if cfg.rewards is not None else None
        reward_model = place.load_model(cfg.reward_model, frozen_dtype=frozen) if cfg.reward_model else None

        # -------------------------------------------------------------- policy, reference, value model
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        reference = place.load_model(cfg.ref_model, frozen_dtype=frozen) if cfg.ref_model else None
        value_model = place.load_model(value_model_config(cfg))
        logp_options = dict(chunk_size=cfg.loss_chunk_size, temperature=cfg.temperature)

        # -------------------------------------------------------------- optimizers, schedules, state
        updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
        optimizer = build_optimizer(cfg.optimizer, model)
        value_optimizer = build_optimizer(cfg.value_optimizer or cfg.optimizer, value_model)
        schedule = partial(instantiate, cfg.lr_scheduler, num_training_steps=data.total_steps * updates_per_step)
        scheduler, value_scheduler = schedule(optimizer=optimizer), schedule(optimizer=value_optimizer)
        state = TrainState(model=model, value_model=value_model, optimizer=optimizer,
                           value_optimizer=value_optimizer, lr_scheduler=scheduler,
                           value_lr_scheduler=value_scheduler, data=data, sampling=sampling)
        run.resume(state)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        value_model.train()
        for step in run.steps(data.total_steps):
            # ---- rollout: one completion of each prompt by the policy as it is now
            started = time.perf_counter()
            prompts = data.next()[0]
            out = rollout(model, [p["prompt_ids"] for p in prompts], max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=tokenizer.stop_ids,
                          generator=sampling.generator, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
            rollout_time = time.perf_counter() - started
            lengths = torch.tensor([len(c) for c in out.completions], device=device)
            mask = completion_mask(lengths).bool()  # [N, T]: each row's completion tokens, its stop token included
            pieces = micro_batches(len(out), num_minibatches=cfg.num_minibatches,
                                   accumulation=cfg.gradient_accumulation_steps)
            batches = rollout_batches(out, pieces, device)
            slices = [s for minibatch in pieces for s in minibatch]

            # ---- scores, KL-penalised token rewards, values -> GAE advantages and returns
            metrics = MetricSums(device)
            if reward_model is not None:
                raw = torch.cat([reward_model_scores(reward_model, batches[(s.start, s.stop)]) for s in slices])
                metrics.add({"reward": raw})
            else:
                per_function = score_rollouts(rewards, prompts, out.completions, tokenizer, num_generations=1)
                raw = rewards.total(per_function).to(device)
            stopped = ~torch.tensor(out.truncated, device=device)
            scores = missing_stop_penalty(raw, stopped, cfg.missing_eos_penalty)
            old_logps = padded(torch.cat(out.logprobs), mask)  # what the rows were sampled with
            ref_logps, values = old_logps.clone(), torch.zeros_like(old_logps)
            with torch.no_grad():
                for s in slices:
                    batch = batches[(s.start, s.stop)]
                    if cfg.kl_coef:
                        ref_logps[s] = padded(reference_logprobs(model, reference, batch, **logp_options), mask[s])
                    values[s] = padded(token_values(value_model, batch), mask[s])
            rewards_t = token_rewards(scores, old_logps, ref_logps, mask, kl_coef=cfg.kl_coef,
                                      estimator=cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards_t = masked_whiten(rewards_t, mask, shift_mean=False, reduce=global_sum)
            advantages, returns = gae(rewards_t, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            advantages = masked_whiten(advantages, mask, reduce=global_sum)
            kl = (kl_estimate(old_logps, ref_logps, cfg.kl_estimator) * mask).sum(1)  # per completion
            metrics.add({"score": scores, "kl": kl, "non_score_reward": -cfg.kl_coef * kl,
                         "rlhf_reward": scores - cfg.kl_coef * kl, "completion_length": lengths.float(),
                         "truncated": (~stopped).float()})

            # ---- ppo_epochs passes of clipped updates over minibatches
            started = time.perf_counter()
            sums = torch.zeros(6, device=device)  # loss, policy/value loss, their clip fractions, entropy
            first_ratio_error = None
            for epoch in range(cfg.ppo_epochs):
                for minibatch in pieces:
                    rows = slice(minibatch[0].start, minibatch[-1].stop)
                    num_tokens = global_sum(mask[rows].sum().float())  # the minibatch's, on all ranks
                    update_loss = torch.zeros((), device=device)
                    for s in minibatch:
                        batch, share = batches[(s.start, s.stop)], mask[s].sum() / num_tokens
                        logp, entropy, _ = completion_logprobs(model, batch, **logp_options)
                        logps = padded(logp, mask[s])
                        new_values = padded(token_values(value_model, batch), mask[s])
                        policy = policy_loss(logps, old_logps[s], advantages[s], mask[s], clip=cfg.epsilon)
                        value = value_loss(new_values, values[s], returns[s], mask[s], clip=cfg.cliprange_value)
                        loss = (policy.loss + cfg.vf_coef * value.loss) * share  # token mean over the minibatch
                        loss.backward()
                        if epoch == 0 and minibatch is pieces[0]:  # before any update the ratio is 1
                            error = ratio_error(logps, old_logps[s], mask[s])
                            first_ratio_error = error if first_ratio_error is None else \
                                torch.maximum(first_ratio_error, error)
                        update_loss += loss.detach()
                        sums += share * torch.stack([policy.loss + cfg.vf_coef * value.loss, policy.loss, value.loss,
                                                     policy.clip_fraction, value.clip_fraction,
                                                     entropy.mean()]).detach()
                        del loss
                    grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                                   lr_scheduler=scheduler, loss=update_loss, run=run)
                    value_grad_norm, _ = optimizer_step(value_optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                                        lr_scheduler=value_scheduler, loss=update_loss, run=run)
            train_time = time.perf_counter() - started

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                num_new = int(lengths.sum())
                loss, p_loss, v_loss, p_clip, v_clip, entropy = global_sum(sums) / updates_per_step
                row_metrics = metrics.means(("reward", "score", "kl", "non_score_reward", "rlhf_reward",
                                             "completion_length", "truncated"))
                if rewards is not None:
                    row_metrics.update(reward_metrics(rewards, per_function, device=device))
                run.log(loss=loss, policy_loss=p_loss, value_loss=v_loss, **row_metrics, entropy=entropy,
                        **{"clip_ratio/policy": p_clip, "clip_ratio/value": v_clip},
                        first_ratio_error=first_ratio_error, lr=lr, grad_norm=grad_norm,
                        value_grad_norm=value_grad_norm, rollout_time=rollout_time, train_time=train_time,
                        rollout_tokens_per_second=num_new / max(rollout_time, 1e-9), num_tokens=num_new)
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                held_out = dict(max_new_tokens=cfg.max_new_tokens, device=device, max_batches=cfg.max_eval_batches)
                run.log(**(evaluate_rewards(model, val, rewards, tokenizer, **held_out) if rewards is not None else
                           evaluate_reward_model(model, reward_model, val, tokenizer, **held_out)))
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
