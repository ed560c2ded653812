"""Reward model: a decoder with a scalar score head, trained on preference pairs with the
Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected - margin)  (TRL's RewardTrainer).

    tune run reward_model --config llama/tiny_reward_lora         # LoRA adapters + the score head
    tune run reward_model --config llama/tiny_reward_full         # every weight trains
    tune run --nproc_per_node 2 reward_model --config ...         # FSDP2

The model node asks for the head (`num_labels: 1`: a causal LM gets a fresh score head in place
of its LM head) or loads a *ForSequenceClassification checkpoint that has one. A pair's reward
is the head at its last real token (`models/score.py`); chosen and rejected answers go through
the model in one padding-free forward. A per-pair `margin` column, when the data has one, asks
r_chosen - r_rejected to exceed it (Llama-2's margin loss); `center_rewards_coefficient` adds
coefficient * mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 (Eisenstein et
al. 2023, TRL's form). Logged: loss, accuracy (r_chosen > r_rejected), rewards/chosen,
rewards/rejected, margin (their mean difference), and the held-out pairwise accuracy.

The result is a Hugging Face sequence-classification model (`score.weight`, e.g.
`LlamaForSequenceClassification`): <output_dir>/final (full), or with LoRA the PEFT adapter
(<output_dir>/adapter, the score head saved with it) and, with save_final_model, the merged
model (<output_dir>/merged). `transformers.AutoModelForSequenceClassification` loads both, and
so does `load_pretrained` for the PPO recipes' reward and value models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import Range
from tunewright.training.train_config import LoRAConfig, TrainConfig

if TYPE_CHECKING:  # torch loads in main(): `tune validate` reads Config without it
    import torch

LOGGED = ("accuracy", "rewards/chosen", "rewards/rejected", "margin")


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    # coefficient * mean((r_chosen + r_rejected)^2) added to the loss; TRL suggests 0.01
    center_rewards_coefficient: Annotated[float, Range(gt=0, hint="null: no centring")] | None = None


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                  center_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair loss [B] from the rewards [B] of each pair's answers: -log sigmoid(r_c - r_r -
    margin), plus the centring term per pair. Its mean over a batch is TRL's RewardTrainer loss;
    the loop sums it and divides by the pairs of the whole step, so accumulation and ranks
    split a step without changing it."""
    import torch.nn.functional as F

    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff)
    if center_coefficient is not None:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


def pair_losses(model: torch.nn.Module, batch: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """Per-pair losses [B] and metrics of one batch: the rewards are the score head at each
    answer's last token, chosen rows first, then rejected (`data/preference.py`)."""
    from tunewright.models.score import sequence_scores

    chosen, rejected = sequence_scores(model, batch, padding_free=cfg.padding_free)[:, 0].chunk(2)
    losses = bradley_terry(chosen, rejected, margin=batch.get("margin"),
                           center_coefficient=cfg.center_rewards_coefficient)
    chosen, rejected = chosen.detach(), rejected.detach()
    return losses, {"rewards/chosen": chosen, "rewards/rejected": rejected, "margin": chosen - rejected,
                    "accuracy": (chosen > rejected).double()}


def main(cfg: Config) -> list[dict]:
    from functools import partial

    import torch

    from tunewright.models.score import require_score_head
    from tunewright.training.batching import StepBatches, global_sum, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora_with_score_head, check_score_head_targets, peft_adapter_ok
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.preference import MetricSums, evaluate_preference, pair_count
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    lora = cfg.lora_rank is not None
    require_score_head(cfg.model, num_labels=1)  # the model's config.json only: seconds
    check_score_head_targets(cfg)
    seed_everything(cfg.seed)
    with Placement(cfg) as place:
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data: preference pairs
        _, train, val = build_data(cfg)
        if "chosen_tokens" not in train.dataset[0]:
            raise ValueError("dataset: a reward model trains on pairs (prompt, chosen, rejected); use "
                             "_component_: tunewright.data.preference.preference_dataset")
        data = StepBatches.from_config(train, cfg)  # the micro-batches of each step, epoch by epoch

        # -------------------------------------------------------------- model: LoRA adapters, and
        # the score head trains whole
        adapt = partial(add_lora_with_score_head, cfg=cfg) if lora else None
        model = place.load_model(cfg.model, adapt=adapt, quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        objective = partial(pair_losses, model, cfg=cfg)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            micro_batches = data.next()
            num_pairs = pair_count(micro_batches, device=device)  # this step's, on every rank
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metrics = MetricSums(device)
            for batch in micro_batches:
                losses, values = objective(to_device(batch, device))
                (losses.sum() / num_pairs).backward()
                loss_sum += losses.detach().sum()
                metrics.add(values)
                del losses  # its spent graph, alive into the next forward, raises peak memory
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=loss_sum, run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                run.log(loss=global_sum(loss_sum) / num_pairs, **metrics.means(LOGGED), lr=lr, grad_norm=grad_norm,
                        epoch=data.epoch, num_pairs=num_pairs.long(),
                        **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                held_out = evaluate_preference(lambda batch, _: objective(batch), val, device=device, model=model,
                                               max_batches=cfg.max_eval_batches)
                run.log(**{f"val_{key}": value for key, value in held_out.items()})  # val_accuracy, ...
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=write_adapter)  # adapter/, final/ or merged/
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
