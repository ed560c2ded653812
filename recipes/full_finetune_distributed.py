"""Full fine-tuning over many processes with FSDP2 (and tensor parallel): every weight trains.

    tune run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full_distributed
    tune run full_finetune_distributed --config llama/tiny_full_distributed     # one process

The objective, loop and logging are those of `full_finetune_single_device`; what differs is the
set-up (`training/parallel.py`): the model is built on the meta device, sharded, then each rank
loads only its slices of the checkpoint (`training/sharded_io.py`); `batch_size` is per process
and each rank reads its own shard of the data; checkpoints are sharded (DCP); the final model is
gathered one tensor at a time and written by rank 0 file by file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.train_config import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, ParallelConfig):
    # Step each weight as soon as its (sharded) gradient is ready and free it: full gradients
    # never exist at once. Needs gradient_accumulation_steps: 1 and clip_grad_norm: null.
    optimizer_in_backward: bool = False


def main(cfg: Config) -> list[dict]:
    import copy

    from tunewright.training import distributed as dist
    from tunewright.training.instantiate import instantiate
    from tunewright.training.optim_in_backward import OptimizerInBackward, check_optimizer_in_backward
    from tunewright.training.parallel import (build_mesh, build_meta_model, close_distributed,
                                              init_distributed, materialize, parallelize,
                                              sharded_checkpointer)
    from tunewright.training.run_dir import prepare_output_dir
    from tunewright.training.setup import seed_everything, setup_device, training_dtype
    from tunewright.training.sft_setup import build_data, build_trainer
    from tunewright.training.sharded_io import load_hf_sharded, save_pretrained_sharded

    # ------------------------------------------------------------------ set-up
    if cfg.optimizer_in_backward:
        check_optimizer_in_backward(cfg)
    seed_everything(cfg.seed)
    device, created = init_distributed(setup_device(cfg.device, cfg.num_threads),
                                       timeout_minutes=cfg.collective_timeout_minutes)
    try:
        mesh = build_mesh(device, data_parallel_dim=cfg.data_parallel_dim,
                          tensor_parallel_dim=cfg.tensor_parallel_dim)
        prepare_output_dir(cfg)
        dtype = training_dtype(cfg.dtype, device)

        # -------------------------------------------------------------- model: meta -> sharded
        model, model_dir = build_meta_model(cfg.model, dtype)
        skeleton = copy.deepcopy(model)  # unsharded, on meta: names and shapes for export
        parallelize(model, mesh, cfg)
        materialize(model, device, cpu_offload=cfg.fsdp_cpu_offload)
        load_hf_sharded(model, model_dir, dtype=dtype)
        if dist.is_main():
            num_params = sum(p.numel() for p in model.parameters())
            print(f"model of {num_params:,} parameters sharded over {dist.world_size()} processes "
                  f"(mesh dp={mesh['dp'].size()} x tp={mesh['tp'].size()})")

        # -------------------------------------------------------------- data + loop
        _, train, val = build_data(cfg)
        optimizer = None
        if cfg.optimizer_in_backward:
            optimizer = OptimizerInBackward(model.parameters(),
                                            lambda params: instantiate(cfg.optimizer, params=params))
        trainer = build_trainer(cfg, model, train, val, device=device, optimizer=optimizer,
                                checkpointer=sharded_checkpointer(cfg.async_checkpoint))
        history = trainer.fit()

        # -------------------------------------------------------------- export
        if cfg.save_final_model:
            out = save_pretrained_sharded(model, skeleton, Path(cfg.output_dir) / "final",
                                          source_dir=model_dir)
            if out is not None:
                print(f"saved the fine-tuned model (Hugging Face format) to {out}")
        return history
    finally:
        close_distributed(created)


if __name__ == "__main__":
    recipe_main(__file__)
