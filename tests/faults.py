"""Simulated crashes for resume tests: the n-th optimizer step of a recipe raises instead of
stepping, as a kill would leave it (nothing of that step applied, logged or saved).

Recipes import `optimizer_step` from `tunewright.training.optim` when `main` runs, so patching
the module attribute reaches every recipe, shipped or copied."""

from __future__ import annotations

from typing import Any, Callable

from tunewright.training import optim


def failing_optimizer_step(n: int, exc: type[BaseException] = KeyboardInterrupt,
                           before: Callable[[], None] | None = None) -> Callable[..., Any]:
    """`optimizer_step` that raises `exc` on its n-th call (after calling `before`)."""
    real = optim.optimizer_step
    calls = [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            if before is not None:
                before()
            raise exc(f"simulated crash at step {n}")
        return real(*args, **kwargs)

    return step


def crash_at_step(monkeypatch: Any, n: int) -> None:
    """Make the n-th optimizer step of the next recipe run raise `KeyboardInterrupt`."""
    monkeypatch.setattr(optim, "optimizer_step", failing_optimizer_step(n))
