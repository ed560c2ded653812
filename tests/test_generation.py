"""Decoding (`training/generation.py`) against references: the KV-cache loop equals rerunning the
whole sequence each step and transformers' greedy `generate`; sampling keeps to its top-k /
top-p support, is reproducible with a seed; stop ids end each sequence; streaming text is
exactly the decoded text."""

from __future__ import annotations

import io

import pytest
import torch

from tunewright.models import ModelArgs, build_model, save_pretrained
from tunewright.models.builder import init_weights
from tunewright.training.generation import TokenStream, generate, sample, strip_stop

ARGS = {
    "gqa_untied": ModelArgs(family="llama", vocab_size=101, dim=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_dim=128),
    "mha_tied": ModelArgs(family="llama", vocab_size=101, dim=64, num_layers=2, num_heads=4,
                          num_kv_heads=4, intermediate_dim=96, tie_embeddings=True),
}
PROMPTS = [[1, 5, 7, 9, 11], [3, 4], [8, 8, 2, 60, 7], [99]]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: extra threads only add contention on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str = "gqa_untied") -> torch.nn.Module:
    model = build_model(ARGS[name], device="cpu")
    # A wider init than the default 0.02 so logits are far from ties: the argmax is then the
    # same under any summation order (ours vs transformers).
    init_weights(model, seed=0, std=0.3)
    return model.eval()


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", list(ARGS))
def test_kv_cache_greedy_equals_rerunning_the_whole_sequence(name):
    model = tiny(name)
    got = generate(model, PROMPTS, max_new_tokens=24)
    assert got == [greedy_without_cache(model, p, 24) for p in PROMPTS]
    assert len(set(map(tuple, got))) == len(PROMPTS)  # not a degenerate model
    assert generate(model, PROMPTS[0], max_new_tokens=24) == [got[0]]  # one prompt, flat list


def test_model_state_is_restored():
    model = tiny().train()
    generate(model, [1, 2, 3], max_new_tokens=3)
    assert model.training
    assert all(layer.attn.kv_cache is None for layer in model.layers)


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    save_pretrained(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompts = [[1, 5, 7, 9, 11], [8, 8, 2, 60, 7]]  # equal lengths: HF needs no padding
    n = 20
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 5, dtype=torch.long),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                           eos_token_id=None)
    assert generate(model, prompts, max_new_tokens=n) == want[:, 5:].tolist()

    # With a stop id: HF pads a finished row with pad_token_id; ours just ends it.
    stop = want[0, 5 + 6].item()
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 5, dtype=torch.long),
                           do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=stop)
    got = generate(model, prompts, max_new_tokens=n, stop_ids=[stop])
    want = [row[:row.index(stop) + 1] if stop in row else row for row in want[:, 5:].tolist()]
    assert got == want
    assert got[0][-1] == stop and len(got[0]) <= 7


def test_stop_ids_end_each_sequence_on_its_own():
    model = tiny()
    full = generate(model, PROMPTS, max_new_tokens=24)
    stop = full[0][5]
    got = generate(model, PROMPTS, max_new_tokens=24, stop_ids={stop, 1000}, pad_id=3)
    for row, ids in zip(full, got):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert ids == row[:end]  # the rows that go on are unaffected by the stopped one
    assert got[0][-1] == stop and strip_stop(got[0], [stop]) == full[0][:full[0].index(stop)]


def test_on_token_reports_every_token_in_order():
    model = tiny()
    seen: list[tuple[int, int]] = []
    got = generate(model, PROMPTS, max_new_tokens=6, on_token=lambda i, t: seen.append((i, t)))
    for i, ids in enumerate(got):
        assert [t for j, t in seen if j == i] == ids


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny()
    greedy = generate(model, PROMPTS, max_new_tokens=16)
    assert generate(model, PROMPTS, max_new_tokens=16, temperature=2.0, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, max_new_tokens=16, temperature=2.0, top_p=1e-6, seed=1) == greedy


def test_sampling_is_reproducible_with_a_seed_and_keeps_to_top_k():
    model = tiny()
    kwargs = dict(max_new_tokens=24, temperature=3.0, top_k=4)
    a = generate(model, PROMPTS, seed=7, **kwargs)
    assert generate(model, PROMPTS, seed=7, **kwargs) == a
    assert generate(model, PROMPTS, seed=8, **kwargs) != a
    assert a != generate(model, PROMPTS, max_new_tokens=24)  # it did sample
    with torch.no_grad():
        for prompt, ids in zip(PROMPTS, a):
            seq = prompt + ids
            logits = model(torch.tensor([seq]))[0, len(prompt) - 1:-1]  # predicting each new id
            top4 = logits.topk(4, dim=-1).indices
            assert all(t in top4[i].tolist() for i, t in enumerate(ids))


def test_sample_top_p_support_and_frequencies():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    # 0.5 + 0.3 >= 0.75: the nucleus is {1, 3}, renormalised to 0.625 / 0.375.
    draws = sample(logits, temperature=1.0, top_p=0.75, generator=g)
    assert set(draws.tolist()) == {1, 3}
    assert (draws == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)
    draws = sample(logits, temperature=1.0, top_p=0.85, generator=g)
    assert set(draws.tolist()) == {1, 2, 3}
    draws = sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}
    # Ties at the k-th value still give exactly k candidates.
    tied = torch.tensor([[1.0, 3.0, 1.0, 1.0]]).expand(2000, 4)
    assert len(set(sample(tied, temperature=1.0, top_k=2, generator=g).tolist())) == 2
    assert sample(logits[:2], temperature=0.0).tolist() == [1, 1]


def test_draw_frequencies_follow_the_probabilities_and_never_pick_a_zero():
    from tunewright.training.generation import draw

    # Unnormalised weights with zeros at both ends and between, and one tiny entry.
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 1e-3, 5.0, 0.0])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    ids = draw(weights.expand(n, -1), generator=g)
    counts = torch.bincount(ids, minlength=len(weights)).double()
    assert counts[weights == 0].sum() == 0
    expected = weights.double() / weights.sum() * n
    keep = expected > 0
    # Pearson's chi-square over 4 free cells: its 99.99th percentile is ~23.5.
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    assert chi2 < 23.5, (counts, expected)
    # Same generator state, same draws (rollouts' resume depends on it).
    again = draw(weights.expand(n, -1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_draw_over_several_blocks_follows_the_probabilities():
    """The two-level draw (block sums, then the running sums inside one block): entries at
    block edges, a whole zero block and a vocabulary that is not a multiple of the block."""
    from tunewright.training.generation import draw

    weights = torch.zeros(300)  # blocks of 64: 0-63, 64-127, 128-191 (all zero), 192-255, 256-299 (+ padding)
    weights[[0, 63, 64, 200, 255, 299]] = torch.tensor([1.0, 3.0, 2.0, 0.5, 1e-3, 4.0])
    n = 200_000
    ids = draw(weights.expand(n, -1), generator=torch.Generator().manual_seed(1), block=64)
    counts = torch.bincount(ids, minlength=len(weights)).double()
    assert ids.max() < 300 and counts[weights == 0].sum() == 0
    expected = weights.double() / weights.sum() * n
    keep = expected > 0
    # Pearson's chi-square over 5 free cells: its 99.99th percentile is ~25.7.
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    assert chi2 < 25.7, (counts[keep], expected[keep])


def test_vocab_size_keeps_ids_below_it():
    model = tiny()
    got = generate(model, PROMPTS, max_new_tokens=24, temperature=50.0, seed=0, vocab_size=10)
    assert all(t < 10 for ids in got for t in ids)


def test_bad_arguments_are_value_errors():
    model = tiny()
    for kwargs, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                          (dict(max_new_tokens=-1), "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            generate(model, [1, 2], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompt"):
        generate(model, [], max_new_tokens=2)
    assert generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]


def test_token_stream_writes_exactly_the_decoded_text():
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.training.tiny_assets import tiny_asset

    tok = load_tokenizer(tiny_asset("llama"))  # one token per byte: characters split over tokens
    text = "héllo, 世界 🙂!\nnext line"
    ids = tok.encode(text) + [tok.eos_id]
    out = io.StringIO()
    stream = TokenStream(tok, file=out)
    written = []
    for t in ids:
        stream(0, t)
        written.append(out.getvalue())
    assert stream.finish() == out.getvalue() == text  # the stop id is not shown
    assert not any("\ufffd" in w for w in written)  # a split character waits for its last byte
    with pytest.raises(ValueError, match="one sequence"):
        stream(1, ids[0])


def test_token_stream_finish_writes_a_cut_character():
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.training.tiny_assets import tiny_asset

    tok = load_tokenizer(tiny_asset("llama"))
    out = io.StringIO()
    stream = TokenStream(tok, file=out)
    for t in tok.encode("ab世")[:-1]:  # the last byte of 世 never comes
        stream(0, t)
    assert out.getvalue() == "ab"
    assert stream.finish() == "ab\ufffd"
