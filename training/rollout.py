"""Rollouts for online RL: many prompts x `num_generations` sampled at once with the model being
trained, returning the completions and the log-probs they were sampled with.

    out = rollout(model, prompts, num_generations=8, max_new_tokens=256, temperature=1.0,
                  stop_ids=tokenizer.stop_ids, generator=gen)
    out.completions[i]   # ids of row i (prompt-major: prompt i // 8, generation i % 8)
    out.logprobs[i]      # log p(token) under softmax(logits / temperature), one per id
    out.truncated[i]     # ran into max_new_tokens without a stop id

Unlike `generation.generate` (prompts of one length decoded together), every row of every
prompt length decodes in one batch: the cache holds the prompts left-padded to the longest,
each row's RoPE positions start at its own first real token, and a key mask hides the padding
from attention (`Decoder.forward(key_mask=...)`). Each distinct prompt is prefilled once,
padding-free (the prompts end to end, `Decoder.forward(cache_index=...)` writing each token's
keys into its row of the cache), and its KV cache copied to its generations. Rows that stop
are dropped from the batch (and their caches) once a quarter of the batch has stopped, so
finished rows stop costing compute.

The log-probs are those of the full distribution at `temperature` (before top-k / top-p cut
it), which is what the training step recomputes (`objectives.token_logprobs(temperature=)`):
the same model and numbers, so the first importance ratio of a batch is 1 (tested to 1e-5 in
fp32). Sampling draws only from `generator` (resumable: its state goes into checkpoints).

Speed on the CPU (BENCHMARKS.md, `bench/rollout_vs_hf.py`): fp32 linears go through oneDNN
(`modules/onednn_linear.py`, a quarter less matmul time at 32 rows than aten's MKL path), and
with the recipes' `compile: true` the prefill and decode steps run the compiled blocks (the
decode step's ~900 small ops fused; positions and the shrinking batch are traced as symbols,
so a rollout compiles once per layout, not per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from tunewright.modules.onednn_linear import onednn_linears
from tunewright.modules.precision import compute_autocast
from tunewright.training.generation import check_sampling, draw, sample


@dataclass
class Rollouts:
    prompts: list[list[int]]  # one per row (a prompt repeated for each of its generations)
    completions: list[list[int]]  # new ids per row; a stop id, when reached, is the last
    logprobs: list[torch.Tensor]  # float32 [len(completion)] per row, on the model's device
    truncated: list[bool]  # ended by max_new_tokens, not by a stop id

    def __len__(self) -> int:
        return len(self.completions)


class SamplingGenerator:
    """The generator rollouts draw from, as a `TrainState` entry: its state goes into each
    checkpoint, so a resumed run samples what the uninterrupted one would have. Each rank
    has its own stream (`per_rank`: kept per rank in sharded checkpoints)."""

    per_rank = True

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device).manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])

    def reseed(self, seed: int) -> None:
        """A rank the saving run did not have: a stream of its own, not a copy of rank 0's."""
        self.generator.manual_seed(seed)


@torch.no_grad()
def rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    num_generations: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> Rollouts:
    """Sample `num_generations` completions of each prompt (rows in prompt-major order). The
    model is in eval mode meanwhile (no dropout) and gets KV caches, both undone on return."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(f"rollout: num_generations ({num_generations}) and max_new_tokens "
                         f"({max_new_tokens}) must be >= 1")
    unique = [[int(t) for t in p] for p in prompts]
    if not unique or any(not p for p in unique):
        raise ValueError("rollout: every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # The head too under autocast, as the training step computes it; oneDNN's fp32 linear on
        # the CPU (modules/onednn_linear.py: a quarter less matmul time at rollout batch sizes).
        with compute_autocast(model, device), onednn_linears(device, next(model.parameters()).dtype):
            ids, logp, lengths, stopped = _decode(
                model, unique, num_generations, max_new_tokens, device=device, pad_id=pad_id,
                stops=torch.tensor(sorted({int(t) for t in stop_ids}) or [-1], device=device),
                pick=lambda logits: _pick(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, vocab_size=vocab_size))
    finally:
        model.reset_caches()
        model.train(was_training)
    lengths_host, ids_host = lengths.tolist(), ids.tolist()
    rows = range(len(lengths_host))
    return Rollouts(
        prompts=[unique[i // num_generations] for i in rows],
        completions=[ids_host[i][:lengths_host[i]] for i in rows],
        logprobs=[logp[i, :lengths_host[i]] for i in rows],
        truncated=[not s for s in stopped.tolist()],
    )


def _decode(
    model: nn.Module, prompts: list[list[int]], g: int, max_new_tokens: int, *, device: torch.device,
    pad_id: int, stops: torch.Tensor, pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probs [rows, max_new_tokens], lengths, stopped [rows]) of every output row."""
    n, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    # The cache holds the prompts left-padded to the longest; each row's positions count from
    # its first real token.
    lens = [len(p) for p in prompts]
    lengths = torch.tensor(lens)
    padding = width - lengths  # each row's left padding in the cache
    starts = padding.to(device)
    cols = torch.arange(total, device=device)
    key_mask = cols[None, :] >= starts[:, None]  # [n, total]: real (or still to come) positions
    positions = (cols[None, :] - starts[:, None]).clamp(min=0)

    # Prefill padding-free: the prompts end to end in one row (no FLOP on padding, which in a
    # batch of mixed lengths can be a third of the prefill), each token's keys written to its
    # row and column of the left-padded cache.
    model.setup_caches(n, total)
    rows = torch.repeat_interleave(torch.arange(n), lengths)  # each packed token's prompt
    host_pos = torch.cat([torch.arange(k) for k in lens])  # and its position in that prompt
    cache_index = (rows.to(device), (host_pos + padding[rows]).to(device))
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
    hidden = model(tokens, input_pos=host_pos.to(device)[None], seq_lens=lens, cache_index=cache_index,
                   hidden_only=True)
    last = lengths.cumsum(0).sub(1).to(device)  # each prompt's last token in the packed row
    # Each prompt prefilled once; its cache and last logits copied to its g generations.
    copies = torch.arange(n, device=device).repeat_interleave(g)
    model.select_cache_rows(copies)
    logits = model.head(hidden[0, last]).float()[copies]
    key_mask, positions = key_mask[copies], positions[copies]

    rows = n * g
    ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # the output row of each batch row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # per batch row
    for step in range(max_new_tokens):
        next_ids, chosen = pick(logits)
        live = ~finished
        ids[active[live], step] = next_ids[live]
        logp[active[live], step] = chosen[live]
        lengths[active[live]] = step + 1
        finished = finished | torch.isin(next_ids, stops)
        stopped[active] = finished
        if step == max_new_tokens - 1:
            break
        # One read back per step (the batch's shape depends on it), as any stop check needs.
        num_done = int(finished.sum())
        if _done_everywhere(num_done == len(active), device):
            break
        if len(active) > num_done and num_done * 4 >= len(active):  # a quarter finished: drop those rows
            keep = (~finished).nonzero().squeeze(1)
            model.select_cache_rows(keep)
            active, next_ids, finished = active[keep], next_ids[keep], finished[keep]
            key_mask, positions = key_mask[keep], positions[keep]
        else:  # a finished row idles, writing nothing, until enough rows have finished
            next_ids = next_ids.masked_fill(finished, pad_id)
        pos = width + step
        hidden = model(next_ids[:, None], input_pos=positions[:, pos:pos + 1], cache_pos=pos,
                       key_mask=key_mask, hidden_only=True)
        logits = model.head(hidden[:, -1]).float()
    return ids, logp, lengths, stopped


def _pick(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next ids [b], their log-probs [b] under softmax(logits / temperature)) for logits [b, vocab].
    Without top-k / top-p the draw takes exp(logits - max) unnormalised and the log-probs come
    from the chosen logits less the log of its float64 sum (3 vs 13 ms a step at 32 x 49,152
    against a log-softmax and its exp: passes over the vocabulary are what sampling costs); the
    ids stay below `vocab_size`, the log-probs are over every logit, as the training step's
    recomputation."""
    scaled = logits / temperature if temperature > 0 else logits
    peak = scaled.amax(dim=-1, keepdim=True)
    weights = (scaled - peak).exp_()
    if temperature > 0 and top_k is None and top_p is None:
        next_ids = draw(weights[:, :vocab_size], generator=generator)
    else:
        next_ids = sample(logits[:, :vocab_size], temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
    log_total = weights.sum(dim=-1, dtype=torch.float64).log().float()
    return next_ids, scaled.gather(1, next_ids[:, None]).squeeze(1) - peak.squeeze(1) - log_total


def _done_everywhere(done: bool, device: torch.device) -> bool:
    """Whether every data-parallel rank's rows have finished: under FSDP each decode step's
    forward gathers weights from all ranks, so a rank whose rows are done keeps stepping (its
    finished rows idle) until all are."""
    from tunewright.training.distributed import any_rank

    return not any_rank(not done, device)
