"""What a checkpoint holds: the stateful things of a run, by name.

    state = TrainState(policy=policy, value=value, policy_opt=opt1, value_opt=opt2,
                       lr_scheduler=scheduler, data=data)
    run.resume(state)            # restores every entry in place (training/run.py)
    run.save(state)              # writes every entry, atomically

A recipe names whatever its algorithm has: one model or several, one optimizer per model or
more, schedulers, data streams, counters. Entries are told apart by type:

- a model (`nn.Module`): its *trainable* parameters only; frozen weights (a LoRA base, a
  reference or teacher model) come from their pretrained files at every start;
- an optimizer (`torch.optim.Optimizer`): its whole state;
- anything else with `state_dict()` / `load_state_dict()` (a scheduler, `StepBatches`, a
  recipe's own counter object): its state dict, which must hold plain values and tensors
  (checkpoints are read with `weights_only=True`); one marked `per_rank = True` (each rank's
  sampling generator) is kept per rank in sharded checkpoints, with a `reseed(seed)` for a
  rank the saving run did not have.

`None` entries are skipped, so `lr_scheduler=None` needs no special case. RNG state (torch,
python, CUDA) is always saved and restored with the entries.

The two checkpoint formats (`training/checkpointing.py` for one process,
`training/dcp_checkpoint.py` for sharded runs) read the entries from here; DCP also needs each
optimizer's model, which `optimizer_owners` finds by parameter identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainState:
    def __init__(self, **entries: Any) -> None:
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.objects: dict[str, Any] = {}
        for name, value in entries.items():
            if value is None:
                continue
            if isinstance(value, nn.Module):
                self.models[name] = value
            elif isinstance(value, torch.optim.Optimizer):
                self.optimizers[name] = value
            elif callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
                self.objects[name] = value
            else:
                raise TypeError(f"TrainState entry '{name}' ({type(value).__name__}) has no "
                                "state_dict/load_state_dict: it cannot be checkpointed")

    def names(self) -> list[str]:
        return [*self.models, *self.optimizers, *self.objects]

    def optimizer_owners(self) -> dict[str, str]:
        """Optimizer name -> the name of the model whose parameters it steps."""
        owner_of = {id(p): name for name, model in self.models.items() for p in model.parameters()}
        owners: dict[str, str] = {}
        for name, optimizer in self.optimizers.items():
            found = {owner_of.get(id(p)) for group in optimizer.param_groups for p in group["params"]}
            if None in found or len(found) != 1:
                where = "no model of the state" if None in found else f"several models ({', '.join(sorted(found))})"
                raise ValueError(f"TrainState: optimizer '{name}' steps parameters of {where}; give each "
                                 "optimizer the parameters of one model, and put that model in the state")
            owners[name] = found.pop()
        return owners
