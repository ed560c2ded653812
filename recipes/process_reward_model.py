"""Process reward model (PRM): a decoder with a token-classification head that rates each step
of a solution, trained on step labels (TRL's `PRMTrainer`, Math-Shepherd's data form).

    tune run process_reward_model --config llama/tiny_prm_full
    tune run process_reward_model --config smollm2/135M_prm_lora_single_device

Rows are `prompt`, `completions` (the steps) and `labels` (true/false per step)
(`data/step_labels.py`): the steps are joined by `step_separator` and each label sits on its
step's separator. The head (`num_labels: 2` on the model node: a fresh head replaces the LM
head) is read at the separators only, with cross-entropy there (`training/prm.py`). Logged:
loss, step accuracy, and the F1 of finding wrong steps; the same on the held-out split.

The result is a Hugging Face token-classification model (`LlamaForTokenClassification`:
`model.*` + `score.weight`), which `transformers.AutoModelForTokenClassification` loads:
<output_dir>/final (full), or with LoRA the merged model <output_dir>/merged (PEFT's
token-classification adapter is not written). `tunewright.training.rewards.process_reward_model`
makes it a reward function of the GRPO recipe. One device: sharding it is not wired yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    pass


def main(cfg: Config) -> list[dict]:
    from functools import partial

    import torch

    from tunewright.data.step_labels import StepLabelDataset
    from tunewright.models.score import require_score_head, score_per_token
    from tunewright.training.batching import StepBatches, global_sum, target_count, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora_with_score_head, check_score_head_targets
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.preference import MetricSums
    from tunewright.training.prm import METRICS, evaluate_steps, step_losses, step_scores
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    lora = cfg.lora_rank is not None
    require_score_head(cfg.model, num_labels=2, what="a process reward model")  # config.json only
    check_score_head_targets(cfg)
    seed_everything(cfg.seed)
    with Placement(cfg) as place:
        if place.distributed:
            raise ValueError("process_reward_model runs on one device (distributed: false, no torchrun) for now")
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data: step-labelled rows
        _, train, val = build_data(cfg)
        if not isinstance(train.dataset, StepLabelDataset):
            raise ValueError("dataset: a process reward model trains on step labels (prompt, completions, "
                             "labels); use _component_: tunewright.data.step_labels.step_label_dataset")
        data = StepBatches.from_config(train, cfg)

        # -------------------------------------------------------------- model: a token classifier,
        # LoRA adapters with the head training whole
        adapt = partial(add_lora_with_score_head, cfg=cfg) if lora else None
        model = score_per_token(place.load_model(cfg.model, adapt=adapt, quantize_base=lora and cfg.quantize_base))
        if lora and cfg.save_adapter:
            print("save_adapter: a PRM's adapter is not written in PEFT's format yet; the merged model is "
                  "(unless save_final_model: false)")

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        objective = partial(step_losses, model, padding_free=cfg.padding_free)

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            micro_batches = data.next()
            num_steps = target_count(micro_batches, device=device)  # labelled steps, on every rank
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metrics = MetricSums(device)
            for batch in micro_batches:
                losses, values = objective(to_device(batch, device))
                (losses.sum() / num_steps).backward()
                loss_sum += losses.detach().sum()
                metrics.add(values)
                del losses
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=loss_sum, run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                run.log(loss=global_sum(loss_sum) / num_steps, **step_scores(metrics.means(METRICS)), lr=lr,
                        grad_norm=grad_norm, epoch=data.epoch, num_steps=num_steps.long(),
                        **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                held_out = evaluate_steps(model, val, device=device, padding_free=cfg.padding_free,
                                          max_batches=cfg.max_eval_batches)
                run.log(**{f"val_{key}": value for key, value in held_out.items()})  # val_f1, ...
            if run.due(cfg.save_every_n_steps):
                run.save(state)

        # -------------------------------------------------------------- export
        place.save_results(model, run, cfg, write_adapter=False)  # final/, or merged/ with LoRA
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
