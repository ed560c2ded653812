"""The models around a PPO policy (`recipes/ppo.py`), the checks made on them before any weight
loads, and what a step reads from them.

    check_ppo_config(cfg)                               # one line for a run that cannot work
    node = value_model_config(cfg)                      # the value model's `model` node
    batches = rollout_batches(out, pieces, device)      # the rollout as the step's micro-batches
    values = token_values(value_model, batch)           # V before each completion token, [n]
    ref = reference_logprobs(policy, reference, batch)  # log π_ref of each completion token, [n]
    scores = reward_model_scores(reward_model, batch)   # the reward model's score per row, [rows]

The value model is a decoder of its own with a score head of one label (`models/score.py`), as
in torchtune's and TRL's PPO, and it trains whole (its own optimizer) whether the policy trains
LoRA adapters or every weight. It starts from `value_model` (a reward model's checkpoint: its
score of a finished answer is a fair first guess of the answer's value) or, by default, from the
policy's checkpoint with a fresh head. It reads the policy's token ids, so it must share its
tokenizer. Completion token t's value is the head at the hidden state that predicts t (the state
in which t was chosen), as TRL reads `values[:, context_length - 1 : -1]`.

The reference is the policy with its LoRA adapters disabled (no copy), or a frozen `ref_model`
(needed by full fine-tuning when `kl_coef` > 0: usually the policy's own checkpoint).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from tunewright.training.batching import global_sum, to_device

_SAME_TOKENIZER = "it reads the policy's token ids; give a model of the policy's tokenizer"


def value_model_config(cfg: Any) -> dict[str, Any]:
    """`value_model`, or the policy's `model` node with a fresh one-label score head."""
    return dict(cfg.value_model) if cfg.value_model is not None else {**cfg.model, "num_labels": 1}


def _score_labels(node: dict[str, Any], key: str) -> tuple[str, int | None, int | None]:
    """(path, labels of the checkpoint's own score head, labels the node asks for)."""
    from tunewright.models.registry import model_args
    from tunewright.models.score import classifier_architecture

    path = node.get("path")
    if path is None:
        raise ValueError(f"{key}: set {key}.path, a Hugging Face model directory "
                         "(_component_: tunewright.models.load_pretrained)")
    family, args = model_args(path)
    classifier_architecture(family.name)
    asked = node.get("num_labels")
    if asked is not None and args.num_labels is not None and asked != args.num_labels:
        raise ValueError(f"{key}: {path} has a score head of {args.num_labels} labels, but {key}.num_labels is "
                         f"{asked}; drop {key}.num_labels to keep the checkpoint's head")
    return path, args.num_labels, asked


def check_ppo_config(cfg: Any) -> None:
    """ValueError, one line, before any weight loads: the reward given twice or not at all, a
    KL penalty without a reference, a step that cannot be split, a value or reward model
    without one score label or of another tokenizer than the policy's."""
    from tunewright.training.distill import check_same_vocabulary

    if (cfg.reward_model is None) == (cfg.rewards is None):
        raise ValueError("give the reward either as reward_model (a trained reward model's checkpoint) or as "
                         "rewards (reward functions): exactly one of them")
    if cfg.kl_coef > 0 and cfg.lora_rank is None and cfg.ref_model is None:
        raise ValueError(f"kl_coef ({cfg.kl_coef}) > 0 needs a reference policy, and full fine-tuning has none: "
                         "set ref_model (a frozen copy, usually the node of `model`), train LoRA (the reference is "
                         "the policy with its adapters off), or set kl_coef=0")
    pieces = cfg.num_minibatches * cfg.gradient_accumulation_steps
    if pieces > cfg.batch_size:
        raise ValueError(f"num_minibatches x gradient_accumulation_steps ({cfg.num_minibatches} x "
                         f"{cfg.gradient_accumulation_steps}) is more than the batch_size ({cfg.batch_size}) "
                         "completions of a step: some micro-batches would be empty")

    path, own, asked = _score_labels(value_model_config(cfg), "value_model")
    labels = asked if asked is not None else own
    if labels is None:
        raise ValueError(f"value_model: {path} is a causal language model with no score head; add "
                         "`num_labels: 1` to value_model (a fresh value head), or give a reward model's checkpoint")
    if labels != 1:
        raise ValueError(f"value_model: {path} has a score head of {labels} labels; a value model has one "
                         "(a *ForSequenceClassification checkpoint with num_labels 1, or num_labels: 1 on a causal LM)")
    check_same_vocabulary(cfg.model, value_model_config(cfg), key="value_model", student="policy", why=_SAME_TOKENIZER)
    if cfg.reward_model is not None:
        path, own, _ = _score_labels(cfg.reward_model, "reward_model")
        if own is None:
            raise ValueError(f"reward_model: {path} is a causal language model with no trained score head; give "
                             "a reward model's checkpoint (recipes/reward_model.py writes final/ or merged/), or "
                             "reward functions as rewards")
        if own != 1:
            raise ValueError(f"reward_model: {path} has a score head of {own} labels; PPO reads one score per "
                             "completion (num_labels 1)")
        check_same_vocabulary(cfg.model, cfg.reward_model, key="reward_model", student="policy", why=_SAME_TOKENIZER)
    if cfg.ref_model is not None:
        check_same_vocabulary(cfg.model, cfg.ref_model, key="ref_model", student="policy", why=_SAME_TOKENIZER)


def rollout_batches(out: Any, pieces: list[list[slice]], device: torch.device, *,
                    make_batch: Any = None) -> dict[tuple[int, int], dict]:
    """Each micro-batch slice of a rollout's rows (`grpo.micro_batches`) as a batch of prompt +
    completion whose targets are the completion tokens (`make_batch`: `grpo.rollout_batch`,
    padding-free, by default; GRPO's `shared_prompt_batch` computes a group's prompt once), on
    `device`, keyed by (start, stop)."""
    from tunewright.training.grpo import rollout_batch

    make_batch = make_batch or rollout_batch
    return {(s.start, s.stop): to_device(make_batch(out.prompts[s], out.completions[s]), device)
            for minibatch in pieces for s in minibatch}


def token_values(value_model: nn.Module, batch: dict) -> torch.Tensor:
    """The value head at the hidden state that predicts each target token, [n] float32 in the
    order of `grpo.completion_logprobs` (differentiable)."""
    from tunewright.data.tokenizer.base import IGNORE_INDEX
    from tunewright.modules.precision import compute_autocast
    from tunewright.training.objectives import hidden_states

    with compute_autocast(value_model, batch["tokens"].device):
        hidden, labels, _ = hidden_states(value_model, batch)
        return value_model.head(hidden[labels != IGNORE_INDEX]).float().squeeze(-1)


@torch.no_grad()
def reference_logprobs(policy: nn.Module, reference: nn.Module | None, batch: dict, **options: Any) -> torch.Tensor:
    """log π_ref of each target token, [n]: under the frozen `reference`, or (None) under the
    policy with its adapters disabled, in eval mode. `options` go to `completion_logprobs`."""
    from tunewright.modules.peft.apply import adapters_disabled
    from tunewright.training.grpo import completion_logprobs

    if reference is not None:
        return completion_logprobs(reference, batch, **options)[0]
    was_training = policy.training
    policy.eval()
    try:
        with adapters_disabled(policy):
            return completion_logprobs(policy, batch, **options)[0]
    finally:
        policy.train(was_training)


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, batch: dict) -> torch.Tensor:
    """The reward model's score of each row of a rollout batch, read at its last token (the
    stop token of a completion that ended), [rows] float32."""
    from tunewright.models.score import sequence_scores

    return sequence_scores(reward_model, batch)[:, 0]


def ratio_error(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |π / π_old - 1| over the real tokens: 0 up to rounding before a batch's first update,
    when rollout and training compute the same numbers."""
    return ((logps - old_logps).exp() - 1).abs()[mask.bool()].max()


@torch.no_grad()
def evaluate_reward_model(policy: nn.Module, reward_model: nn.Module, batches: Any, tokenizer: Any, *,
                          max_new_tokens: int, device: torch.device, max_batches: int | None = None) -> dict:
    """`val_reward`: the reward model's mean score of the policy's greedy completions of the
    held-out prompts of `batches` (from their start, at most `max_batches`), over all ranks."""
    from tunewright.training.grpo import rollout_batch
    from tunewright.training.rollout import rollout

    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for prompts in itertools.islice(batches.first_epoch(), max_batches):
        out = rollout(policy, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens, temperature=0.0,
                      stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
        scores = reward_model_scores(reward_model, to_device(rollout_batch(out.prompts, out.completions), device))
        count = torch.tensor(float(len(scores)), dtype=torch.float64, device=device)
        sums += torch.stack([scores.double().sum(), count])
    global_sum(sums)
    return {"val_reward": sums[0] / sums[1].clamp(min=1)}

