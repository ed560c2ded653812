"""Log-probs and entropies of GRPO's training step (training/grpo.py completion_logprobs): the
numbers of `objectives.token_logprobs` and of the full [B, T, V] logits, gradients included,
while only one chunk of logits exists at a time."""

from __future__ import annotations

import torch

from tunewright.models import ModelArgs, build_model
from tunewright.models.builder import init_weights
from tunewright.training.grpo import completion_logprobs, completion_mask, padded, rollout_batch
from tunewright.training.objectives import token_logprobs

ARGS = ModelArgs(family="llama", vocab_size=301, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_dim=128)
PROMPTS = [[1, 5, 7, 9], [3, 4], [8, 8, 2, 60, 7, 9, 10]]
COMPLETIONS = [[11, 12, 13], [14, 15, 16, 17, 18, 19], [20]]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ARGS, device="cpu")
    init_weights(model, seed=0, std=0.1)
    return model


def _full_logits_reference(model, temperature):
    """Every row alone, its whole [T, V] logits: log p and entropy of the completion tokens."""
    logps, entropies = [], []
    for p, c in zip(PROMPTS, COMPLETIONS):
        logits = model(torch.tensor([p + c]))[0, len(p) - 1:-1].float() / temperature  # [len(c), V]
        logp = logits.log_softmax(-1)
        logps.append(logp.gather(1, torch.tensor(c)[:, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


def test_logprobs_and_entropies_equal_the_full_logits_and_token_logprobs():
    model = _model()
    batch = rollout_batch(PROMPTS, COMPLETIONS)
    for temperature in (1.0, 0.7):
        logp, entropy, rows = completion_logprobs(model, batch, chunk_size=4, temperature=temperature)
        want_logp, want_entropy = _full_logits_reference(model, temperature)
        torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, want_entropy.detach(), rtol=0, atol=1e-5)
        same, same_rows = token_logprobs(model, batch, chunk_size=4, temperature=temperature)
        assert torch.equal(logp, same) and torch.equal(rows, same_rows)
        assert rows.tolist() == [i for i, c in enumerate(COMPLETIONS) for _ in c]


def test_gradients_equal_the_full_logits_ones():
    weights = torch.randn(sum(map(len, COMPLETIONS)), generator=torch.Generator().manual_seed(1))
    model = _model()
    logp, _, _ = completion_logprobs(model, rollout_batch(PROMPTS, COMPLETIONS), chunk_size=3)
    (logp * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want_logp, _ = _full_logits_reference(model, 1.0)
    (want_logp * weights).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_padded_places_each_rows_tokens():
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    mask = completion_mask(lengths)
    values = torch.arange(1.0, 11.0, requires_grad=True)
    out = padded(values, mask)
    assert out.tolist() == [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9], [10, 0, 0, 0, 0, 0]]
    out.sum().backward()
    assert values.grad.tolist() == [1.0] * 10


def test_memory_kept_for_backward_is_a_small_part_of_the_logits():
    """What the head and loss keep for backward beyond the decoder's own activations: chunked,
    under 1/8 of the [B, T, V] logits (only each chunk's hidden states); the full-logits way keeps
    more than the logits themselves."""
    from tunewright.training.objectives import hidden_states

    vocab = 4096
    model = build_model(ModelArgs(family="llama", vocab_size=vocab, dim=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_dim=128), device="cpu")
    init_weights(model, seed=0, std=0.1)
    g = torch.Generator().manual_seed(0)
    batch = rollout_batch([torch.randint(0, vocab, (20,), generator=g).tolist() for _ in range(8)],
                          [torch.randint(0, vocab, (60,), generator=g).tolist() for _ in range(8)])

    def kept(fn) -> int:  # bytes of the distinct tensors autograd saves for backward
        seen: dict = {}

        def pack(t):
            seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    def full_logits():
        hidden, labels, _ = hidden_states(model, batch)
        keep = labels != -100
        return model.head(hidden).float().log_softmax(-1)[keep].gather(1, labels[keep][:, None])

    decoder = kept(lambda: hidden_states(model, batch))
    logits_bytes = batch["tokens"].numel() * vocab * 4
    assert kept(lambda: completion_logprobs(model, batch, chunk_size=64)) - decoder <= logits_bytes / 8
    assert kept(full_logits) - decoder >= logits_bytes


# ---------------------------------------------------------------- a prompt computed once per group
GROUP_PROMPTS = [[1, 5, 7, 9]] * 3 + [[3, 4]] * 2 + [[8, 8, 2, 60, 7, 9, 10]]  # groups of 3, 2, 1
GROUP_COMPLETIONS = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24], [25]]


def _full_logits_of(model, prompts, completions):
    logps = []
    for p, c in zip(prompts, completions):
        logits = model(torch.tensor([p + c]))[0, len(p) - 1:-1].float()
        logps.append(logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).squeeze(1))
    return torch.cat(logps)


def test_a_shared_prompt_batch_gives_each_rows_logprobs_and_gradients():
    """Each group's prompt once, its completions attending to it: every row's numbers and the
    gradients are those of the row computed alone (whole logits, independent of the layout)."""
    from tunewright.training.grpo import shared_prompt_batch, shares_prompts

    model = _model()
    assert shares_prompts(model)
    batch = shared_prompt_batch(GROUP_PROMPTS, GROUP_COMPLETIONS)
    assert batch["tokens"].shape[0] == 3  # one row per group
    # the forward's tokens: each prompt once (less its last token, repeated per completion)
    assert batch["num_tokens"] == (3 + 1 + 6) + sum(len(c) + 1 for c in GROUP_COMPLETIONS) == 31
    assert sum(len(p) + len(c) for p, c in zip(GROUP_PROMPTS, GROUP_COMPLETIONS)) == 38  # row by row
    weights = torch.randn(sum(map(len, GROUP_COMPLETIONS)), generator=torch.Generator().manual_seed(2))
    logp, _, rows = completion_logprobs(model, batch, chunk_size=5)
    assert rows.tolist() == [i for i, c in enumerate(GROUP_COMPLETIONS) for _ in c]
    (logp * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = _full_logits_of(model, GROUP_PROMPTS, GROUP_COMPLETIONS)
    (want * weights).sum().backward()
    torch.testing.assert_close(logp, want.detach(), rtol=0, atol=1e-5)
    for name, param in model.named_parameters():  # fp32 sums in another order: 1e-5 of the largest
        assert (got[name] - param.grad).abs().max() <= 1e-5 * param.grad.abs().max(), name


def test_models_with_windows_do_not_share_prompts():
    from tunewright.training.grpo import shares_prompts

    torch.manual_seed(0)
    windowed = build_model(ModelArgs(family="mistral", vocab_size=301, dim=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, intermediate_dim=128, sliding_window=8), device="cpu")
    assert not shares_prompts(windowed)
