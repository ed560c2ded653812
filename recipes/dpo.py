"""Preference optimisation: DPO and its family on pairs of answers, KTO on unpaired ones.

    tune run dpo --config llama/tiny_dpo_lora                     # LoRA: reference = adapters off
    tune run dpo --config llama/tiny_dpo_full                     # full: a frozen reference copy
    tune run dpo --config llama/tiny_dpo_lora loss=simpo          # ipo, hinge, simpo, orpo, kto
    tune run --nproc_per_node 2 dpo --config llama/tiny_dpo_full  # FSDP2

`loss:` picks the objective (`training/preference.py`, each with its paper's formula): `dpo`
(with `label_smoothing` for cDPO, `robust` for robust DPO), `hinge` (RSO), `ipo`, which compare
the policy with a reference; `simpo` and `orpo`, which need none; `kto`, on unpaired examples
(`unpaired_preference_dataset`). `rpo_alpha` adds the chosen answer's NLL to a pairwise
loss (RPO). The reference (`training/reference.py`): with LoRA the same
model with its adapters disabled; with full fine-tuning a frozen copy, or, with
`precompute_ref_logps: true`, one pass of the untrained policy over the data before training,
cached in output_dir. torchtune's names (`lora_dpo_single_device`, `lora_dpo_distributed`,
`full_dpo_distributed`) run this file.

Each step runs chosen and rejected answers of a micro-batch in ONE padding-free forward (rows
0..B-1 chosen, B..2B-1 rejected) and divides the summed per-pair losses by the pairs of the
whole step, so accumulation and data parallelism give the update of one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.schema import Range
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, LoRAConfig, ParallelConfig):
    loss: Literal["dpo", "hinge", "ipo", "simpo", "orpo", "kto"] = "dpo"
    beta: Annotated[float, Range(gt=0)] = 0.1  # DPO's β; IPO's τ; ORPO's λ (TRL's names)
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0  # dpo, simpo: labels flipped with this probability
    robust: bool = False  # dpo with label_smoothing: the unbiased robust DPO loss instead of cDPO
    gamma: Annotated[float, Range(ge=0)] = 0.5  # simpo: the target reward margin γ
    # dpo, hinge, ipo, simpo: + α times the chosen answer's mean NLL per pair (RPO, Pang et al.
    # 2024; TRL's loss_type [sigmoid, sft] / rpo_alpha): the right answer's likelihood rises too
    rpo_alpha: Annotated[float, Range(ge=0)] = 0.0
    desirable_weight: Annotated[float, Range(gt=0)] = 1.0  # kto: λ_D
    undesirable_weight: Annotated[float, Range(gt=0)] = 1.0  # kto: λ_U
    # Full fine-tuning: reference log-probs from one pass before training (no frozen copy kept),
    # cached in output_dir so a resumed run reads them.
    precompute_ref_logps: bool = False


def pair_losses(cfg: Config, logps: Any, counts: Any, ref_logps: Any, batch: dict, kl: Any) -> tuple[Any, dict]:
    """The chosen objective on a batch's sequence log-probs: (per-pair losses, metrics)."""
    from tunewright.training import preference as P

    if cfg.loss == "kto":
        return P.kto(logps, ref_logps, batch["label"], kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                     undesirable_weight=cfg.undesirable_weight)
    b = batch["num_pairs"]  # rows 0..b-1 chosen, b..2b-1 rejected
    chosen, rejected, n_chosen, n_rejected = logps[:b], logps[b:], counts[:b], counts[b:]
    if cfg.loss == "orpo":
        return P.orpo(chosen, rejected, n_chosen, n_rejected, beta=cfg.beta)
    ref_chosen, ref_rejected = (ref_logps[:b], ref_logps[b:]) if ref_logps is not None else (None, None)
    if cfg.loss == "simpo":
        losses, metrics = P.simpo(chosen, rejected, n_chosen, n_rejected, beta=cfg.beta, gamma=cfg.gamma,
                                  label_smoothing=cfg.label_smoothing)
    elif cfg.loss == "ipo":
        losses, metrics = P.ipo(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta=cfg.beta)
    elif cfg.loss == "hinge":
        losses, metrics = P.hinge(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta)
    else:
        losses, metrics = P.dpo(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                                label_smoothing=cfg.label_smoothing, robust=cfg.robust)
    if cfg.rpo_alpha:
        losses = losses + cfg.rpo_alpha * P.chosen_nll(chosen, n_chosen)
    return losses, metrics


def main(cfg: Config) -> list[dict]:
    # Imported here, not at the top: `tune validate` and torchrun's config check read `Config`
    # without loading torch.
    from functools import partial

    import torch

    from tunewright.training.batching import StepBatches, global_sum, to_device, token_counts
    from tunewright.training.data_setup import build_data
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora, peft_adapter_ok
    from tunewright.training.objectives import sequence_logprobs
    from tunewright.training.optim import build_optimizer, optimizer_step
    from tunewright.training.placement import Placement
    from tunewright.training.preference import (LOGGED, REFERENCE_FREE, MetricSums, check_preference_config,
                                                check_preference_data, evaluate_preference, kto_kl, pair_count)
    from tunewright.training.reference import Reference, cache_key, precompute, with_reference
    from tunewright.training.run import Run
    from tunewright.training.setup import seed_everything
    from tunewright.training.state import TrainState

    # ------------------------------------------------------------------ set-up
    check_preference_config(cfg)
    seed_everything(cfg.seed)
    with Placement(cfg) as place:  # this device, or FSDP2 shards over torchrun's processes
        run = Run.from_config(cfg, checkpointer=place.checkpointer())
        device = place.device

        # -------------------------------------------------------------- data (pairs, or KTO's examples)
        _, train, val = build_data(cfg)
        check_preference_data(cfg.loss, train.dataset)
        data = StepBatches.from_config(train, cfg)  # the micro-batches of each step, epoch by epoch

        # -------------------------------------------------------------- policy and reference
        lora = cfg.lora_rank is not None
        model = place.load_model(cfg.model, adapt=partial(add_lora, cfg=cfg) if lora else None,
                                 quantize_base=lora and cfg.quantize_base)
        write_adapter = lora and peft_adapter_ok(model, cfg)
        logp_options = dict(chunk_size=cfg.loss_chunk_size, padding_free=cfg.padding_free)
        reference = None
        if cfg.loss in REFERENCE_FREE:
            pass  # simpo, orpo
        elif cfg.precompute_ref_logps:  # before resume: the policy still is the reference now
            live = Reference.adapters_off(model, **logp_options) if lora else Reference.of(model, **logp_options)
            for split, batches in (("train", train), ("val", val)):
                if batches is not None:
                    key = cache_key(batches.dataset, cfg.model, cfg.dtype)
                    with_reference(batches, precompute(live, batches, device=device, cache_dir=run.output_dir,
                                                       split=split, key=key))
            reference = Reference.precomputed()
        elif lora:
            reference = Reference.adapters_off(model, **logp_options)
        else:
            reference = Reference.frozen(place.load_model(cfg.model, frozen_dtype=place.dtype), **logp_options)

        def objective(batch: dict, kl: Any = None) -> tuple[Any, dict]:
            logps, counts = sequence_logprobs(model, batch, **logp_options)
            ref_logps = reference.logps(batch) if reference is not None else None
            return pair_losses(cfg, logps, counts, ref_logps, batch, kl)

        # -------------------------------------------------------------- optimizer, schedule, state
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = instantiate(cfg.lr_scheduler, optimizer=optimizer, num_training_steps=data.total_steps)
        state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=data)
        run.resume(state)
        export = place.adapter_export(model) if write_adapter else None  # into each checkpoint

        # -------------------------------------------------------------- the loop
        model.train()
        for step in run.steps(data.total_steps):
            micro_batches = [to_device(b, device) for b in data.next()]
            num_pairs = pair_count(micro_batches, device=device)  # this step's, on every rank
            kl = None
            if cfg.loss == "kto":  # z₀: mismatched pairs' log-ratio over the whole step, no gradient
                with torch.no_grad():
                    kl_rows = [to_device(b["kl"], device) for b in micro_batches]
                    kl_sum = sum((sequence_logprobs(model, rows, **logp_options)[0] - reference.logps(rows)).sum()
                                 for rows in kl_rows)
                kl = kto_kl(global_sum(kl_sum.double()), num_pairs)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metrics = MetricSums(device)
            for batch in micro_batches:
                losses, values = objective(batch, kl)
                (losses.sum() / num_pairs).backward()
                loss_sum += losses.detach().sum()
                metrics.add(values)
                del losses  # its spent graph, alive into the next forward, raises peak memory
            grad_norm, lr = optimizer_step(optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                           lr_scheduler=scheduler, loss=loss_sum, run=run)

            if run.due(cfg.log_every_n_steps, first=True, final=True):
                kto_logged = {"kl": kl} if kl is not None else {}
                run.log(loss=global_sum(loss_sum) / num_pairs, **metrics.means(LOGGED), **kto_logged, lr=lr,
                        grad_norm=grad_norm, epoch=data.epoch, num_pairs=num_pairs.long(),
                        **token_counts(micro_batches, padding_free=cfg.padding_free))
            if val is not None and run.due(cfg.eval_every_n_steps, final=True):
                held_out = evaluate_preference(objective, val, device=device, max_batches=cfg.max_eval_batches,
                                               model=model, kl=kl)
                run.log(**{f"val_{key}": value for key, value in held_out.items()})
            if run.due(cfg.save_every_n_steps):
                run.save(state, export=export)

        # -------------------------------------------------------------- export
        save_final = cfg.save_final_model if cfg.save_final_model is not None else not lora
        if write_adapter and cfg.save_adapter:
            place.save_adapter(model, run.output_dir / "adapter")
        if save_final:
            place.save_model(model, run.output_dir / ("merged" if lora else "final"), merge=lora)
        run.close()
        return run.history


if __name__ == "__main__":
    recipe_main(__file__)
