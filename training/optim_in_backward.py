"""Optimizer in backward: each parameter is stepped as soon as its gradient is ready, and that
gradient is freed right away, so the full set of gradients never exists at once (for full
fine-tuning that saves memory the size of the trainable weights).

    optimizer = OptimizerInBackward(params, lambda ps: instantiate(cfg.optimizer, params=ps))
    trainer = build_trainer(cfg, model, train, val, device=device, optimizer=optimizer)

API (also used by the distributed recipes):
- `check_optimizer_in_backward(cfg)`: the one-line `ValueError` for a config that cannot use it
  (the key is `optimizer_in_backward` in the full recipes' `Config`).
- `OptimizerInBackward(params, make_optimizer)`: one `make_optimizer([p])` per parameter,
  stepped from `p.register_post_accumulate_grad_hook`. To the shared `Trainer` it is a
  `torch.optim.Optimizer`: `step()` and `zero_grad()` do nothing (the hooks did the work),
  `param_groups` are the inner optimizers' own groups (the same dicts), so an lr scheduler
  built on it sets every inner optimizer's lr and the Trainer reports it, and `state_dict()` /
  `load_state_dict()` hold every inner optimizer's state for exact resume.

The update is the same as one optimizer's over all parameters for any per-parameter optimizer
(SGD, Adam, AdamW, ...). It cannot combine with gradient accumulation (a parameter would step on
each micro-batch) or with clipping by the global norm (no moment holds all gradients).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


def check_optimizer_in_backward(cfg: Any) -> None:
    """Fail in one line, naming the key, when the config needs all gradients at once."""
    if cfg.gradient_accumulation_steps != 1:
        raise ValueError(f"optimizer_in_backward needs gradient_accumulation_steps: 1 (got "
                         f"{cfg.gradient_accumulation_steps}): each weight steps as soon as its "
                         "gradient is ready")
    if cfg.clip_grad_norm is not None:
        raise ValueError(f"optimizer_in_backward needs clip_grad_norm: null (got {cfg.clip_grad_norm}): "
                         "the global norm needs every gradient at once")


class OptimizerInBackward(torch.optim.Optimizer):
    def __init__(
        self, params: Iterable[nn.Parameter],
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_one(opt))
                       for p, opt in zip(self.params, self.optimizers)]
        # The inner groups themselves (not copies): what a scheduler writes, they read.
        super().__init__(self._inner_groups(), defaults={})

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @staticmethod
    def _step_one(opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)  # the memory saving: this gradient is gone now
        return hook

    def step(self, closure: Any = None) -> None:
        """Nothing to do: every parameter stepped in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed in backward."""

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            found = "a plain optimizer's state" if states is None else f"{len(states)} optimizers"
            raise ValueError(f"optimizer_in_backward: the checkpoint holds {found}, this model "
                             f"has {len(self.optimizers)} trainable parameters; was the config changed?")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        # Loading gives each inner optimizer new group dicts: point ours (which a scheduler
        # holds by reference) at them.
        self.param_groups[:] = self._inner_groups()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
