"""The keys of the distillation recipes (knowledge_distillation, on_policy_distillation) that
name the teacher and the divergence; the recipes add their own. Torch-free, like every schema:
`tune validate` reads it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tunewright.training.schema import Range, component


@dataclass(kw_only=True)
class DistillConfig:
    # A frozen model of the same tokenizer (another size of the family); its vocabulary must
    # match the student's (config.json vocab_size and tokenizer.json), checked before any step.
    teacher_model: dict[str, Any] = component(required=True)
    # The dtype the teacher is stored and computes in (null: the run's `dtype`); a bf16 teacher
    # halves its memory next to an fp32 student.
    teacher_dtype: Literal["fp32", "bf16"] | None = None
    # training/distill.py: forward_kl KL(p_T||p_S), reverse_kl KL(p_S||p_T), their mean, or
    # GKD's generalized JSD with `beta` (0: forward KL, 1: reverse KL).
    kd_loss: Literal["forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd"] = "forward_kl"
    beta: Annotated[float, Range(ge=0, le=1)] = 0.5
    temperature: Annotated[float, Range(gt=0)] = 1.0  # both softmaxes of the divergence
