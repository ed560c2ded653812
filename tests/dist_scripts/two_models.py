"""A recipe-shaped loop with two models and two optimizers (a toy policy and value pair, as PPO
has), a scheduler, a data stream and a counter of its own, all checkpointed through one
`TrainState`; for tests/test_train_state.py.

    python two_models.py --out DIR [--sharded] [--stop-after N] [--resume auto]
    torchrun --nproc_per_node 2 two_models.py --out DIR --sharded ...

Each step draws noise from the global RNG and from a per-rank `SamplingGenerator` (so an
exact resume must restore both, each rank its own), updates the
value model towards a target that depends on the policy, and the policy towards one that
depends on the value. `--sharded` shards both models with FSDP2 (under torchrun) and writes DCP
checkpoints; otherwise one process writes whole tensors. Rank 0's `<out>/metrics.jsonl` has the
per-step losses.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from tunewright.data.sampler import ResumableSampler
from tunewright.training import distributed as dist
from tunewright.training.batching import Batches, StepBatches, global_sum
from tunewright.training.checkpointing import LocalCheckpointer
from tunewright.training.dcp_checkpoint import ShardedCheckpointer
from tunewright.training.optim import optimizer_step
from tunewright.training.rollout import SamplingGenerator
from tunewright.training.run import Run
from tunewright.training.state import TrainState

DIM, NUM_PROMPTS = 8, 12


class Counter:
    """A recipe's own stateful thing: how many samples the policy has seen."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def build(seed: int, out_dim: int, sharded: bool) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights in every launch and on every rank
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, out_dim))
    if sharded and dist.is_distributed():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (dist.world_size(),)))
        model.set_gradient_divide_factor(1.0)  # losses are divided by the global count below
        model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--stop-after", type=int, default=None, help="steps this launch runs")
    parser.add_argument("--resume", default="false")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        torch_dist.init_process_group("gloo")
    policy, value = build(0, DIM, args.sharded), build(1, 1, args.sharded)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=0.03)
    value_opt = torch.optim.SGD(value.parameters(), lr=0.1, momentum=0.9)
    prompts = [{"x": torch.randn(DIM, generator=torch.Generator().manual_seed(i))} for i in range(NUM_PROMPTS)]
    sampler = ResumableSampler(NUM_PROMPTS, seed=5, rank=dist.rank(), world_size=dist.world_size())
    batches = Batches(prompts, sampler, 4 // dist.world_size(), lambda rows: torch.stack([r["x"] for r in rows]))
    data = StepBatches(batches, epochs=4, max_steps=args.steps)
    scheduler = torch.optim.lr_scheduler.StepLR(policy_opt, step_size=3, gamma=0.5)
    counter = Counter()
    sampling = SamplingGenerator(100 + dist.rank())  # each rank's own stream, as rollouts draw
    state = TrainState(policy=policy, value=value, policy_opt=policy_opt, value_opt=value_opt,
                       schedule=scheduler, data=data, counter=counter, sampling=sampling)
    checkpointer = ShardedCheckpointer() if args.sharded else LocalCheckpointer()
    run = Run(args.out, resume_from_checkpoint=args.resume, checkpointer=checkpointer, progress_bar=False)
    run.resume(state)

    for launch_step, _ in enumerate(run.steps(data.total_steps), start=1):
        if args.stop_after is not None and launch_step > args.stop_after:
            break  # as if the run had been stopped here
        [x] = data.next()
        noise = 0.1 * torch.randn_like(x)  # global RNG: resume must restore it
        noise = noise + 0.1 * torch.randn(x.shape, generator=sampling.generator)  # and each rank's own
        n = global_sum(torch.tensor(float(x.shape[0])))
        action = policy(x + noise)
        value_loss = (value(action.detach()).squeeze(-1) - action.detach().square().mean(-1)).square().sum()
        (value_loss / n).backward()
        optimizer_step(value_opt, clip_grad_norm=1.0)
        policy_loss = -(value(action).squeeze(-1)).sum() + action.square().sum()
        (policy_loss / n).backward()
        value_opt.zero_grad(set_to_none=True)  # the policy's loss must not move the value model
        optimizer_step(policy_opt, lr_scheduler=scheduler)
        counter.seen += int(n)
        run.log(policy_loss=global_sum(policy_loss.detach()) / n, value_loss=global_sum(value_loss.detach()) / n,
                seen=counter.seen)
        if run.due(args.save_every):
            run.save(state)
    checkpointer.wait()
    run.close()
    if dist.is_distributed():
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
