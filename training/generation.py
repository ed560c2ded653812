"""Text generation with KV caches: greedy, temperature, top-k and top-p sampling, stop ids.

    ids = generate(model, tokenizer.encode("Once"), max_new_tokens=32, stop_ids=tokenizer.stop_ids)

The prompt is run once (prefill, filling every layer's KV cache), then each new token is one
forward of a single position (`model(next[:, None], cache_pos=pos)`), so a step costs the same
however long the text is. Greedy decoding gives exactly the tokens of the slow loop that reruns
`model(whole_sequence)` each step (tested), and the tokens of transformers' `generate`.

Batches: our KV cache has one write position for the whole batch, so rows must start decoding
at the same position. Rather than left-padding (which needs per-row positions and attention
masks through every layer), prompts of equal length are decoded together as one batch and
groups of different lengths run one after another. Results come back in the order given. A row
that has stopped is fed `pad_id` until the rest of its group is done; those tokens are dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

import torch
from torch import nn

from tunewright.modules.onednn_linear import onednn_linears

# Called with (index of the prompt, token id) for every generated token, in order, as soon as
# it is chosen: a stop token is reported too (it is the last one of its sequence).
OnToken = Callable[[int, int], None]


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or unset), got {top_p}")


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [b, vocab] -> next token ids [b].

    temperature 0 is greedy (argmax; the first of equal maxima, as torch and transformers pick).
    Otherwise sample from softmax(logits / temperature) restricted to the `top_k` most likely
    tokens and then to the nucleus: the most likely tokens whose probabilities first add up to
    `top_p` (Holtzman et al. 2019); the most likely token always stays.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)
        # Scatter rather than `logits < kth`: ties with the k-th value would keep more than k.
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the more likely ones already hold top_p of the mass.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return draw(logits.softmax(dim=-1), generator=generator)


def draw(probs: torch.Tensor, *, generator: torch.Generator | None = None, block: int = 512) -> torch.Tensor:
    """One id per row of `probs` [b, vocab] (non-negative, not necessarily summing to 1), with
    probability proportional to its entry: inverse-CDF sampling, one uniform per row against the
    running sums. `torch.multinomial` draws an exponential per vocabulary entry instead, which
    measured ~5x slower on the CPU at 32 x 49,152. Sums in float64, so that a token of
    probability 1e-9 keeps it: float32 running sums over 50k entries are off by ~1e-5.

    Two levels, so that the float64 running sums cover `block` entries, not the vocabulary: the
    sums of blocks of `block` ids pick the block, the running sums inside that one block pick the
    id (1.4 vs 10.4 ms at 32 x 49,152 on 2 threads; the same law, up to float64 rounding)."""
    b, vocab = probs.shape
    num_blocks = -(-vocab // block)
    if num_blocks * block != vocab:  # zeros past the vocabulary: never picked
        probs = torch.nn.functional.pad(probs, (0, num_blocks * block - vocab))
    blocks = probs.reshape(b, num_blocks, block)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [b, blocks]
    u = torch.rand((b, 1), generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    # right=True: the first block (then id) whose running sum exceeds u, so a zero-probability
    # block or id (a flat step of the sums) is never picked.
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=num_blocks - 1)
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks[torch.arange(b, device=probs.device), j.squeeze(1)].cumsum(-1, dtype=torch.float64)
    # The inner sums add the same entries in another order: keep the target below their own
    # total, so rounding can never step past the block's last positive entry.
    target = torch.minimum(u - before, inner[:, -1:] * (1 - 2 ** -50))
    k = torch.searchsorted(inner, target, right=True).clamp_(max=block - 1)
    return (j * block + k).squeeze(1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """The new tokens for each prompt (one list of ids, or a list of them), prompt excluded.

    A sequence ends after `max_new_tokens` or at the first of `stop_ids`, which is kept as its
    last token (as transformers does). `seed` makes sampling reproducible without touching the
    global RNG; without it sampling draws from torch's global generator. The model is put in
    eval mode for the call and given KV caches, both undone on return. Positions are not capped
    at the model's context length: the caller decides what to cut (see `tune chat`).
    `vocab_size` (pass the tokenizer's) keeps generation to ids below it: embedding tables are
    often padded past the tokenizer's vocabulary, and those rows decode to nothing.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = _as_prompts(prompt_ids)
    stops = frozenset(int(t) for t in stop_ids)
    device = next(model.parameters()).device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    groups: dict[int, list[int]] = {}  # prompt length -> indices of the prompts of that length
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        with onednn_linears(device, next(model.parameters()).dtype):  # fp32 CPU: modules/onednn_linear.py
            for indices in groups.values():
                tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=device)
                new = _decode_group(
                    model, tokens, indices, max_new_tokens=max_new_tokens, stops=stops, pad_id=pad_id,
                    on_token=on_token,
                    pick=lambda logits: sample(logits[:, :vocab_size], temperature=temperature,
                                               top_k=top_k, top_p=top_p, generator=generator),
                )
                for i, ids in zip(indices, new):
                    out[i] = ids
    finally:
        model.reset_caches()
        model.train(was_training)
    return out


def _as_prompts(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    if len(prompt_ids) == 0:
        raise ValueError("generate: no prompt given")
    first = prompt_ids[0]
    one = isinstance(first, int) or (torch.is_tensor(first) and first.ndim == 0)
    prompts = [list(prompt_ids)] if one else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (give at least one token, e.g. bos)")
    return [[int(t) for t in p] for p in prompts]


def _decode_group(
    model: nn.Module,
    tokens: torch.Tensor,  # [g, s]: prompts of one length
    indices: list[int],
    *,
    max_new_tokens: int,
    stops: frozenset[int],
    pad_id: int,
    on_token: OnToken | None,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> list[list[int]]:
    g, s = tokens.shape
    model.setup_caches(g, s + max_new_tokens)
    switch = _rope_switch(model)
    seq = tokens  # everything so far: a LongRoPE model re-runs it once (see `_rope_switch`)
    # Prefill: the head runs on the last position only; full prompt logits [g, s, vocab] would
    # cost s times the memory for nothing.
    hidden = model(tokens, cache_pos=0, hidden_only=True)
    logits = model.head(hidden[:, -1])  # [g, vocab]
    out: list[list[int]] = [[] for _ in range(g)]
    done = [False] * g
    for step in range(max_new_tokens):
        next_ids = pick(logits.float())  # [g]
        for row, token in enumerate(next_ids.tolist()):  # one sync per step: stop checks need it
            if done[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(indices[row], token)
            done[row] = token in stops
        if all(done) or step == max_new_tokens - 1:
            break
        if any(done):
            next_ids = next_ids.masked_fill(torch.tensor(done, device=next_ids.device), pad_id)
        pos = s + step
        if switch is not None:
            seq = torch.cat([seq, next_ids[:, None]], dim=1)
        if switch is not None and pos == switch and s <= switch:
            # The sequence just outgrew the original context: every cached key was rotated with
            # the short factors, and from here on all positions use the long ones. Recompute
            # the cache from the whole sequence, as transformers' Phi-3 does at this step.
            logits = model.head(model(seq, cache_pos=0, hidden_only=True)[:, -1])
        else:
            logits = model(next_ids[:, None], cache_pos=pos)[:, -1]
    return out


def _rope_switch(model: nn.Module) -> int | None:
    """The length past which a LongRoPE model rotates every position differently (its original
    context), or None: then cached keys stay valid for the whole generation."""
    rope = getattr(model, "rope", None)
    if getattr(rope, "rope_type", None) != "longrope":
        return None
    return int(rope.scaling["original_max_position_embeddings"])


class TokenStream:
    """An `on_token` callback that writes the text of one sequence as its tokens arrive.

    A token's text can depend on its neighbours (a UTF-8 character split over byte tokens,
    SentencePiece's leading space), so each step decodes a short window of recent tokens and
    writes only what the new token added, holding back a trailing incomplete character.
    Ids in `skip_ids` (default: the tokenizer's stop ids) are not shown. `text` is what was
    written; call `finish()` at the end to write what is still held back.
    """

    def __init__(self, tokenizer, *, file: TextIO | None = None,
                 skip_ids: Iterable[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.file = file if file is not None else sys.stdout
        self.skip_ids = frozenset(tokenizer.stop_ids if skip_ids is None else skip_ids)
        self.ids: list[int] = []
        self.text = ""
        self._index: int | None = None
        self._prefix = 0  # ids[_prefix:_read] is the context window already written
        self._read = 0

    def __call__(self, index: int, token: int) -> None:
        if self._index is None:
            self._index = index
        elif index != self._index:
            raise ValueError("TokenStream follows one sequence; generate one prompt to stream it")
        if token in self.skip_ids:
            return
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._write(new_text[len(prefix_text):])
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> str:
        """Write what is held back (an incomplete character at the end); returns all the text."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        rest = self.tokenizer.decode(self.ids[self._prefix:])[len(prefix_text):]
        if rest:
            self._write(rest)
        self._prefix = self._read = len(self.ids)
        return self.text

    def _write(self, text: str) -> None:
        self.text += text
        self.file.write(text)
        self.file.flush()


def strip_stop(ids: list[int], stop_ids: Iterable[int]) -> list[int]:
    """`ids` without the stop token that ended them, if one did."""
    return ids[:-1] if ids and ids[-1] in frozenset(stop_ids) else ids


def merge_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter and fold it into the weights, in place: generation then
    runs at the base model's speed. A mismatched adapter is a `ValueError` naming the tensor."""
    from tunewright.models.peft_adapter import load_peft_adapter
    from tunewright.modules.peft.apply import merge_lora

    load_peft_adapter(model, adapter_dir)
    return merge_lora(model)
