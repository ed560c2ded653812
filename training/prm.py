"""Process reward models: the loss and metrics of step labels read at their separators.

A PRM is a token classifier (`models/score.py` `token_scores`, 2 labels: 0 a wrong step, 1 a
right one, TRL's `PRMTrainer`), trained with cross-entropy at each step's separator only (the
labels elsewhere are -100). Step accuracy counts right predictions over all labelled steps; the
F1 is that of finding wrong steps (label 0 the positive class, as ProcessBench scores a PRM),
so a model that calls every step right scores 0, however few the wrong steps.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-step indicators whose means over a step (or a held-out set) give accuracy and F1.
METRICS = ("accuracy", "true_error", "false_error", "missed_error")


def step_losses(model: torch.nn.Module, batch: dict[str, Any], *, padding_free: bool = True
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of each labelled step [num_targets] and the `METRICS` indicators."""
    from tunewright.models.score import token_scores

    logits, labels = token_scores(model, batch, padding_free=padding_free)  # [n, 2], [n]
    losses = F.cross_entropy(logits, labels, reduction="none")
    pred = logits.detach().argmax(dim=-1)
    wrong, called_wrong = labels == 0, pred == 0
    return losses, {"accuracy": (pred == labels).double(), "true_error": (wrong & called_wrong).double(),
                    "false_error": (~wrong & called_wrong).double(), "missed_error": (wrong & ~called_wrong).double()}


def step_scores(means: dict[str, Tensor]) -> dict[str, Tensor]:
    """`accuracy` and `f1` (of the wrong-step class) from the means of `METRICS`: the ratio of
    means is the ratio of counts, so this is the F1 over every step the means cover."""
    out = {k: v for k, v in means.items() if k not in METRICS[1:]}
    if "true_error" in means:
        tp, fp, fn = means["true_error"], means["false_error"], means["missed_error"]
        out["f1"] = 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12)
    return out


@torch.no_grad()
def evaluate_steps(model: torch.nn.Module, batches: Any, *, device: torch.device | str,
                   padding_free: bool = True, max_batches: int | None = None) -> dict[str, Tensor]:
    """Held-out `loss` (mean over steps), step `accuracy` and `f1` over `batches` from their
    start (at most `max_batches`) and all data-parallel ranks, the model in eval mode meanwhile."""
    from tunewright.training.batching import to_device
    from tunewright.training.preference import MetricSums

    was_training = model.training
    model.eval()
    sums = MetricSums(device)
    for batch in itertools.islice(batches.first_epoch(), max_batches):
        losses, values = step_losses(model, to_device(batch, device), padding_free=padding_free)
        sums.add({"loss": losses, **values})
    model.train(was_training)
    return step_scores(sums.means(("loss", *METRICS)))
