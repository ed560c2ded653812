"""LoRA / QLoRA / DoRA fine-tuning over many processes with FSDP2: only the adapters train.

    tune run --nproc_per_node 8 lora_finetune_distributed --config llama3_1/70B_lora_distributed
    tune run lora_finetune_distributed --config llama/tiny_lora_distributed     # one process

The objective and loop are those of `lora_finetune_single_device`, and the adapters start from
the same values; what differs is the set-up (`training/parallel.py`): adapters (and NF4 for
QLoRA) are put on the model while it is on the meta device, then it is sharded, and each rank
loads only its slices of the base checkpoint (`training/sharded_io.py`). The adapter (PEFT
format) and the merged model are gathered one tensor at a time and written by rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunewright.training.entry import recipe_main
from tunewright.training.parallel import ParallelConfig
from tunewright.training.train_config import LoRAConfig, TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig, ParallelConfig, LoRAConfig):
    pass


def main(cfg: Config) -> list[dict]:
    import copy
    from functools import partial
    from pathlib import Path

    import torch

    from tunewright.modules.peft.qlora import quantize_base_nf4
    from tunewright.training import distributed as dist
    from tunewright.training.lora_setup import adapt_model
    from tunewright.training.parallel import (build_mesh, build_meta_model, check_nf4_shardable,
                                              close_distributed, init_distributed, materialize,
                                              parallelize, sharded_checkpointer)
    from tunewright.training.run_dir import prepare_output_dir
    from tunewright.training.setup import seed_everything, setup_device, training_dtype
    from tunewright.training.sft_setup import build_data, build_trainer
    from tunewright.training.sharded_io import (init_adapters, load_hf_sharded, save_peft_adapter_sharded,
                                                save_pretrained_sharded, write_peft_adapter_sharded)

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.seed)
    device, created = init_distributed(setup_device(cfg.device, cfg.num_threads),
                                       timeout_minutes=cfg.collective_timeout_minutes)
    try:
        mesh = build_mesh(device, data_parallel_dim=cfg.data_parallel_dim,
                          tensor_parallel_dim=cfg.tensor_parallel_dim)
        prepare_output_dir(cfg)
        dtype = training_dtype(cfg.dtype, device)

        # -------------------------------------------------------------- model + adapters, on meta
        model, model_dir = build_meta_model(cfg.model, dtype)
        base_path = cfg.model["path"]
        lora_rng = torch.get_rng_state()  # the adapters' initial values are drawn from here
        adapted, peft_ok = adapt_model(model, cfg)
        skeleton = copy.deepcopy(model)  # unsharded, on meta: names, shapes and merging for export
        if cfg.quantize_base:
            quantize_base_nf4(model)
            check_nf4_shardable(model, mesh)

        # -------------------------------------------------------------- shard, load, init adapters
        parallelize(model, mesh, cfg)
        materialize(model, device, cpu_offload=cfg.fsdp_cpu_offload)
        load_hf_sharded(model, model_dir, dtype=dtype)
        init_adapters(model, adapted, lora_rng)
        num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if dist.is_main():
            print(f"LoRA on {len(adapted)} layers: {num_trainable:,} trainable parameters, sharded "
                  f"over {dist.world_size()} processes (mesh dp={mesh['dp'].size()} x tp={mesh['tp'].size()})")

        # -------------------------------------------------------------- data + loop
        _, train, val = build_data(cfg)
        export = partial(write_peft_adapter_sharded, model, skeleton, base_model_path=base_path) if peft_ok else None
        trainer = build_trainer(cfg, model, train, val, device=device, export=export,
                                checkpointer=sharded_checkpointer(cfg.async_checkpoint))
        history = trainer.fit()

        # -------------------------------------------------------------- export (every rank gathers)
        out = Path(cfg.output_dir)
        if cfg.save_adapter and peft_ok:
            saved = save_peft_adapter_sharded(model, skeleton, out / "adapter", base_model_path=base_path)
            if saved is not None:
                print(f"saved the adapter (PEFT format) to {saved}")
        if cfg.save_final_model:
            merged = save_pretrained_sharded(model, skeleton, out / "merged", source_dir=model_dir,
                                             dtype=dtype, merge=True)
            if merged is not None:
                print(f"saved the merged model (Hugging Face format) to {merged}")
        return history
    finally:
        close_distributed(created)


if __name__ == "__main__":
    recipe_main(__file__)
