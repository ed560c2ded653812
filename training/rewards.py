"""Reward functions of online RL (GRPO): each scores a batch of completions, and a `RewardSet`
weighs them into one reward per completion. Built in: `reasoning_gym_score`, `exact_match`,
`format_reward`, `length_penalty`, `overlong_penalty`, `reward_model` (a trained reward model),
`process_reward_model` (a trained PRM, step by step).

One signature (TRL's), for built-in and user functions alike:

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`prompts` and `completions` are decoded text, one per row; `fields` holds `completion_ids`
(token ids per row) and every other column of the prompt dataset (`answer`, `task`,
`metadata`, ...) as a list with one value per row. It returns one number per row; None means
"does not apply to this row" (it then counts as missing, not 0, as in TRL).

In a config, each entry of `functions` is a `_component_` that *builds* a reward function
(so its options are checked like any component's): a user's function goes in a factory

    def my_rewards(scale: float = 1.0):
        def reward(prompts, completions, **fields): ...
        return reward

    rewards:
      _component_: tunewright.training.rewards.RewardSet
      functions:
        - _component_: tunewright.training.rewards.reasoning_gym_score
        - _component_: tunewright.training.rewards.format_reward
          pattern: '<answer>.*</answer>'
      weights: [1.0, 0.2]                              # TRL's reward_weights; default all 1
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Mapping, Sequence

import torch

RewardFn = Callable[..., Sequence[Any]]
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The answer of a reply: inside its last `<answer>...</answer>`, else its first non-empty
    line, stripped."""
    tagged = _ANSWER.findall(completion)
    if tagged:
        return tagged[-1].strip()
    return next((line.strip() for line in completion.splitlines() if line.strip()), "")


def _named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = fn.__qualname__ = name
    return fn


def reasoning_gym_score(task: str | None = None) -> RewardFn:
    """reasoning-gym's own scorer of each row's task (`task`, or the row's `task` column) on
    the extracted answer (`extract_answer`): 1.0 for a right answer, partial credit where the
    task gives it. Rows need the `answer` and `metadata` columns of `data/prompts.py`."""
    from tunewright.data.reasoning_gym import score_fn

    scorers: dict[str, Callable[[str, Mapping[str, Any]], float]] = {}

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            name = task or fields["task"][i]
            if name not in scorers:
                scorers[name] = score_fn(name)
            row = {"answer": fields["answer"][i], "metadata": fields.get("metadata", [None] * len(completions))[i]}
            out.append(scorers[name](extract_answer(completion), row))
        return out

    return _named(reward, f"reasoning_gym_{task}" if task else "reasoning_gym")


def exact_match(column: str = "answer") -> RewardFn:
    """1.0 when the extracted answer equals the row's `column` (both stripped), else 0.0."""

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        return [float(extract_answer(c) == str(a).strip()) for c, a in zip(completions, fields[column])]

    return _named(reward, "exact_match")


def format_reward(pattern: str = r"^<answer>.*?</answer>$", value: float = 1.0) -> RewardFn:
    """`value` for a completion in which the regular expression `pattern` matches (`re.search`,
    `.` matching newlines too; anchor it with ^...$ for the whole reply), else 0.0."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"format_reward: pattern {pattern!r} is not a regular expression: {e}") from None

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        return [value if compiled.search(c.strip()) else 0.0 for c in completions]

    return _named(reward, "format")


def length_penalty(free_tokens: int = 0, per_token: float = 0.01) -> RewardFn:
    """-per_token for every completion token beyond `free_tokens` (<= 0: a cost on length)."""
    if free_tokens < 0 or per_token < 0:
        raise ValueError(f"length_penalty: free_tokens ({free_tokens}) and per_token ({per_token}) must be >= 0")

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        return [-per_token * max(0, len(ids) - free_tokens) for ids in fields["completion_ids"]]

    return _named(reward, "length_penalty")


def overlong_penalty(max_completion_length: int, soft_punish_cache: int) -> RewardFn:
    """DAPO's soft overlong punishment (`training/grpo.py soft_overlong_penalty`) as a reward."""
    from tunewright.training.grpo import soft_overlong_penalty

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        lengths = torch.tensor([len(ids) for ids in fields["completion_ids"]])
        return soft_overlong_penalty(lengths, max_completion_length=max_completion_length,
                                     soft_punish_cache=soft_punish_cache).tolist()

    return _named(reward, "overlong_penalty")


def reward_model(path: str, *, batch_size: int = 16, device: str = "cpu") -> RewardFn:
    """A reward model as a reward function: its score (`models/score.py`) of each prompt with
    its completion as the assistant's reply, chat-formatted by the reward model's own tokenizer.
    `path`: a `*ForSequenceClassification` directory, e.g. `recipes/reward_model.py`'s `final/`
    or `merged/`."""
    from tunewright.data.collate import collate_flat
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.score import sequence_scores
    from tunewright.training.batching import to_device

    model = load_pretrained(path, device=device).eval()
    if getattr(model.args, "num_labels", None) is None:
        raise ValueError(f"reward_model: {path} is a causal LM, not a reward model (its config.json has no "
                         "num_labels / *ForSequenceClassification architecture)")
    tokenizer = load_tokenizer(path)

    @torch.no_grad()
    def reward(prompts: list, completions: list[str], **fields: Any) -> list[float]:
        rows = []
        for prompt, completion in zip(prompts, completions):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids, _ = tokenizer.tokenize_messages([*turns, {"role": "assistant", "content": completion}])
            rows.append({"tokens": ids, "labels": ids})
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate_flat(rows[start:start + batch_size]), device)
            scores += sequence_scores(model, batch)[:, 0].tolist()
        return scores

    return _named(reward, "reward_model")


def process_reward_model(path: str, *, aggregate: str = "min", step_separator: str = "\n", batch_size: int = 16,
                         device: str = "cpu") -> RewardFn:
    """A process reward model (`recipes/process_reward_model.py`'s `final/` or `merged/`) as a
    reward function: each completion is cut into steps at `step_separator` (empty steps
    dropped), laid out as the PRM was trained (`data/step_labels.py`: the prompt's text, then
    each step and its separator), and each step scored by P(right) at its separator.
    `aggregate` makes one reward of them: `min` (the weakest step, as Lightman et al. 2023 and
    Math-Shepherd score a solution), `last`, `mean` or `prod`. A completion with no step gets
    None. A chat prompt is scored by its last message's text."""
    from tunewright.data.collate import collate_flat
    from tunewright.data.step_labels import encode_steps
    from tunewright.data.tokenizer.base import IGNORE_INDEX
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.score import token_scores
    from tunewright.training.batching import to_device

    reduce = {"min": min, "last": lambda p: p[-1], "mean": lambda p: sum(p) / len(p), "prod": math.prod}
    if aggregate not in reduce:
        raise ValueError(f"process_reward_model: aggregate must be one of {', '.join(reduce)}, got {aggregate!r}")
    model = load_pretrained(path, device=device).eval()
    if not getattr(model.args, "score_per_token", False) or model.args.num_labels != 2:
        raise ValueError(f"process_reward_model: {path} is not a process reward model (its config.json needs a "
                         "*ForTokenClassification architecture with 2 labels)")
    tokenizer = load_tokenizer(path)
    separator_ids = tokenizer.encode(step_separator)

    @torch.no_grad()
    def reward(prompts: list, completions: list[str], **fields: Any) -> list[float | None]:
        rows, counts = [], []
        for prompt, completion in zip(prompts, completions):
            text = prompt if isinstance(prompt, str) else str(prompt[-1]["content"])
            steps = [s for s in completion.split(step_separator) if s.strip()]
            ids, labels = encode_steps(tokenizer, text, steps, None, separator_ids=separator_ids,
                                       max_seq_len=getattr(tokenizer, "max_seq_len", None))
            counts.append(sum(1 for t in labels if t != IGNORE_INDEX))
            if counts[-1]:
                rows.append({"tokens": ids, "labels": labels})
        right: list[float] = []  # P(step right) of every scored step, row after row
        for start in range(0, len(rows), batch_size):
            logits, _ = token_scores(model, to_device(collate_flat(rows[start:start + batch_size]), device))
            right += logits.softmax(dim=-1)[:, 1].tolist()
        out: list[float | None] = []
        for n in counts:
            out.append(float(reduce[aggregate](right[:n])) if n else None)
            right = right[n:]
        return out

    return _named(reward, "process_reward_model")


class RewardSet:
    """Reward functions and their weights: `score` gives each function's rewards [N, K] (NaN
    where a function returned None), `total` their weighted sum per row [N]."""

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float] | None = None) -> None:
        if not functions:
            raise ValueError("rewards.functions: give at least one reward function")
        if weights is not None and len(weights) != len(functions):
            raise ValueError(f"rewards.weights has {len(weights)} values for {len(functions)} reward functions")
        self.functions = list(functions)
        self.weights = torch.tensor([1.0] * len(functions) if weights is None else list(weights), dtype=torch.float32)
        self.names = [getattr(fn, "__name__", type(fn).__name__) for fn in self.functions]
        for i, name in enumerate(self.names):  # two of one kind are told apart by position
            if self.names.count(name) > 1:
                self.names[i] = f"{name}_{i}"

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
              fields: Mapping[str, list[Any]]) -> torch.Tensor:
        """[N, K] float32: reward of each row under each function."""
        n = len(completions)
        out = torch.empty(n, len(self.functions), dtype=torch.float32)
        for k, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                values = list(fn(prompts, completions, completion_ids=completion_ids, **fields))
            except Exception as e:  # the user's code: name it, in one line
                reason = " ".join(f"{type(e).__name__}: {e}".split())
                raise ValueError(f"reward function '{name}' raised {reason}") from e
            if len(values) != n:
                raise ValueError(f"reward function '{name}' returned {len(values)} rewards for {n} completions")
            for i, v in enumerate(values):
                if v is not None and (not isinstance(v, numbers.Real) or not math.isfinite(v)):
                    raise ValueError(f"reward function '{name}' returned {v!r} for completion {i}; "
                                     "expected a finite number (or None: does not apply)")
                out[i, k] = math.nan if v is None else float(v)
        return out

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        """[N]: the weighted sum over functions, missing (None) rewards left out."""
        return (per_function * self.weights.to(per_function.device)).nansum(dim=1)


def score_rollouts(rewards: RewardSet, rows: Sequence[Mapping[str, Any]], completions: list[list[int]],
                   tokenizer: Any, *, num_generations: int) -> torch.Tensor:
    """[N, K] rewards of prompt-major completions (ids, a stop id at the end if one ended
    them) of prompt `rows` (`data/prompts.py` items), each row's fields repeated per generation."""
    from tunewright.training.generation import strip_stop

    owner = [rows[i // num_generations] for i in range(len(completions))]
    texts = [tokenizer.decode(strip_stop(ids, tokenizer.stop_ids)) for ids in completions]
    fields = {key: [row[key] for row in owner] for key in owner[0] if key not in ("prompt", "prompt_ids")}
    return rewards.score([row["prompt"] for row in owner], texts, completions, fields)


def reward_metrics(rewards: RewardSet, per_function: torch.Tensor, *, device: Any) -> dict[str, torch.Tensor]:
    """`reward` (weighted total) and `rewards/<name>` mean and std over the step's rows on all
    data-parallel ranks (missing rewards left out)."""
    from tunewright.training.batching import global_sum

    values = torch.cat([rewards.total(per_function)[:, None], per_function], dim=1).double()  # [N, 1 + K]
    seen = ~values.isnan()
    v = values.nan_to_num(0.0)
    sums = torch.stack([seen.sum(0).double(), v.sum(0), (v * v).sum(0)]).to(device)  # [3, 1 + K]
    global_sum(sums)
    n, mean = sums[0], sums[1] / sums[0].clamp(min=1)
    std = ((sums[2] - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)).sqrt()  # unbiased, as TRL
    out = {"reward": mean[0], "reward_std": std[0]}
    for i, name in enumerate(rewards.names, start=1):
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean[i], std[i]
    return out


@torch.no_grad()
def evaluate_rewards(model: Any, batches: Any, rewards: RewardSet, tokenizer: Any, *, max_new_tokens: int,
                     device: Any, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Held-out rewards of the model's greedy completion of each prompt of `batches` (from
    their start, at most `max_batches`), over all data-parallel ranks: `val_reward` and
    `val_rewards/<name>/mean`."""
    import itertools

    from tunewright.training.rollout import rollout

    scores = []
    for prompts in itertools.islice(batches.first_epoch(), max_batches):
        out = rollout(model, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens, temperature=0.0,
                      stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
        scores.append(score_rollouts(rewards, prompts, out.completions, tokenizer, num_generations=1))
    metrics = reward_metrics(rewards, torch.cat(scores), device=device)
    return {f"val_{key}": value for key, value in metrics.items() if not key.endswith("std")}
