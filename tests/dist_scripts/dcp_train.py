"""A small FSDP2-sharded model trained by a recipe-style loop on the `training/` mechanics with
`ShardedCheckpointer`; launched by tests/test_dcp_checkpoint.py under torchrun (or as a plain
single process).

    torchrun --nproc_per_node 2 dcp_train.py --out DIR [--global-batch 4] [--save-every 2]
        [--stop-after N] [--resume auto] [--async-save] [--optimizer-in-backward]

`--stop-after N` ends the run after N steps as if it had been interrupted (same schedule as the
full run). The SIGKILL test runs the real recipe (tests/test_distributed_resume.py).

Each block holds a frozen "base" weight and trainable low-rank factors, plus a trainable head,
so a checkpoint holds only part of the parameters (as with LoRA) and sharded optimizer state.
The data is 24 fixed regression pairs in `ResumableSampler` order (two epochs in 8 steps of a
global batch of 4). Rank 0's `<out>/metrics.jsonl` has the per-step losses.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as torch_dist
from torch import nn

from tunewright.data.sampler import ResumableSampler
from tunewright.training import distributed as dist
from tunewright.training.dcp_checkpoint import ShardedCheckpointer
from tunewright.training.lr_schedule import cosine_with_warmup
from tunewright.training.optim_in_backward import OptimizerInBackward
from tunewright.training.batching import Batches, StepBatches, global_sum, target_count
from tunewright.training.optim import optimizer_step
from tunewright.training.run import Run
from tunewright.training.state import TrainState

DIM, RANK, NUM_SAMPLES = 16, 4, 24


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.base.requires_grad_(False)
        self.lora_a = nn.Linear(DIM, RANK, bias=False)
        self.lora_b = nn.Linear(RANK, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.base(x) + self.lora_b(self.lora_a(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every launch and on every rank
    model = Toy()
    nn.init.normal_(model.layers[0].lora_b.weight, std=0.1)  # so gradients reach lora_a
    nn.init.normal_(model.layers[1].lora_b.weight, std=0.1)
    if dist.is_distributed():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.world_size(),))
        for module in (*model.layers, model):
            fully_shard(module, mesh=mesh)
            # The loop divides by the global target count: ranks' gradients are summed.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, DIM, generator=g)
    y = torch.randn(NUM_SAMPLES, 3, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(NUM_SAMPLES)]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    x = torch.stack([i["x"] for i in items])
    return {"x": x, "labels": torch.stack([i["labels"] for i in items]), "num_tokens": x.shape[0]}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return (model(batch["x"]) - batch["labels"]).square().sum(), batch["labels"].numel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--stop-after", type=int, default=None, help="steps this launch runs")
    parser.add_argument("--resume", default="false")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--optimizer-in-backward", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        torch_dist.init_process_group("gloo")
    model = build_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    if args.optimizer_in_backward:
        optimizer = OptimizerInBackward(trainable, lambda ps: torch.optim.AdamW(ps, lr=0.05))
    data = dataset()
    batch_size = args.global_batch // dist.world_size()
    sampler = ResumableSampler(len(data), seed=3, rank=dist.rank(), world_size=dist.world_size())
    steps = StepBatches(Batches(data, sampler, batch_size, collate), epochs=2, max_steps=args.max_steps)
    scheduler = cosine_with_warmup(optimizer, num_training_steps=steps.total_steps, num_warmup_steps=2)
    state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=steps)
    checkpointer = ShardedCheckpointer(async_save=args.async_save)
    run = Run(args.out, resume_from_checkpoint=args.resume, checkpointer=checkpointer, progress_bar=False)
    run.resume(state)
    clip = None if args.optimizer_in_backward else 1.0
    for launch_step, _ in enumerate(run.steps(steps.total_steps), start=1):
        if args.stop_after is not None and launch_step > args.stop_after:
            checkpointer.wait()  # a run that ends early but keeps the full run's schedule
            break
        micro_batches = steps.next()
        num_targets = target_count(micro_batches, device="cpu")
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in micro_batches:
            loss, _ = loss_fn(model, batch)
            (loss / num_targets).backward()
            loss_sum += loss.detach()
        optimizer_step(optimizer, clip_grad_norm=clip, lr_scheduler=scheduler)
        run.log(loss=global_sum(loss_sum) / num_targets)
        if run.due(args.save_every):
            run.save(state)
    run.close()
    if dist.is_distributed():
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
