"""The rollout engine (`training/rollout.py`): prompts of different lengths decoded in one batch
give transformers' greedy tokens for each prompt alone; the log-probs it samples with are the
ones a training step recomputes (importance ratio 1); stops, dropped rows and seeds behave."""

from __future__ import annotations

import pytest
import torch

from tunewright.data.tokenizer.base import IGNORE_INDEX
from tunewright.models import ModelArgs, build_model, save_pretrained
from tunewright.models.builder import init_weights
from tunewright.modules.peft.apply import apply_lora
from tunewright.training.objectives import token_logprobs
from tunewright.training.rollout import rollout

ARGS = {
    "llama": ModelArgs(family="llama", vocab_size=101, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_dim=128),
    # Attention variants whose masks follow positions: windows, soft-caps, chunks with NoPE and
    # query temperatures, q/k norms; windows and chunks shorter than the longest prompt.
    "gemma2": ModelArgs(family="gemma2", vocab_size=101, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_dim=128, head_dim=16, sliding_window=4, layer_types=("sliding_attention",
                        "full_attention"), attn_softcap=5.0, final_softcap=30.0, sandwich_norms=True,
                        norm_offset=1.0, embed_scale=8.0, activation="gelu_pytorch_tanh", tie_embeddings=True),
    "llama4": ModelArgs(family="llama4", vocab_size=101, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_dim=128, attn_chunk_size=3, layer_types=("chunked_attention", "full_attention"),
                        nope_layers=(1,), attn_temperature=(4.0, 0.1), qk_norm=True, qk_norm_weight=False,
                        rope_interleaved=True),
    "qwen3": ModelArgs(family="qwen3", vocab_size=101, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_dim=128, head_dim=16, qk_norm=True),
}
PROMPTS = [[1, 5, 7, 9, 11, 4, 2], [3, 4], [8, 8, 2, 60, 7], [99]]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(std: float = 0.3, family: str = "llama") -> torch.nn.Module:
    model = build_model(ARGS[family], device="cpu")
    init_weights(model, seed=0, std=std)  # wide: argmax far from ties under any summation order
    return model.eval()


def test_greedy_rows_of_different_lengths_equal_transformers_one_prompt_at_a_time(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    save_pretrained(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    n = 16
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                              eos_token_id=None)
            want.append(out[0, len(p):].tolist())
    got = rollout(model, PROMPTS, num_generations=2, max_new_tokens=n, temperature=0.0)
    assert got.completions == [w for w in want for _ in range(2)]
    assert got.prompts == [p for p in PROMPTS for _ in range(2)]
    assert got.truncated == [True] * 8
    assert len(set(map(tuple, want))) == len(PROMPTS)  # not a degenerate model


@pytest.mark.parametrize("family", ["gemma2", "llama4", "qwen3"])
def test_mixed_lengths_in_one_batch_equal_each_prompt_decoded_alone(family):
    """The padding-free prefill into a left-padded cache and the masked decode give, for each
    row, the greedy tokens of `generate` on that prompt alone (a cache with no padding)."""
    from tunewright.training.generation import generate

    model = tiny(family=family)
    prompts = PROMPTS + [[4, 9, 13, 2, 6, 6, 31, 8, 1, 17, 5]]  # past the window and the chunks
    n = 12
    want = [generate(model, [p], max_new_tokens=n)[0] for p in prompts]
    got = rollout(model, prompts, num_generations=2, max_new_tokens=n, temperature=0.0)
    assert got.completions == [w for w in want for _ in range(2)]
    assert len(set(map(tuple, want))) == len(prompts)  # not a degenerate model


def test_stops_end_rows_alone_and_dropping_finished_rows_changes_nothing():
    model = tiny()
    full = rollout(model, PROMPTS, max_new_tokens=20, temperature=0.0).completions
    # A stop id that ends some rows early (so rows get dropped from the batch midway).
    stop = full[1][3]
    got = rollout(model, PROMPTS, max_new_tokens=20, temperature=0.0, stop_ids=[stop])
    for row, ids, truncated in zip(full, got.completions, got.truncated):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert ids == row[:end]
        assert truncated == (stop not in row)
    assert sum(not t for t in got.truncated) >= 1


def _training_logprobs(model, rows, temperature):
    """What a training step recomputes: the rows (prompt + completion) padding-free, log-probs
    of the completion tokens at `temperature`."""
    items = []
    for prompt, completion in rows:
        tokens = prompt + completion
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
        items.append((tokens, labels))
    width = max(len(t) for t, _ in items)
    batch = {
        "tokens": torch.tensor([t + [0] * (width - len(t)) for t, _ in items]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in items]),
        "seq_lens": [len(t) for t, _ in items],
    }
    logp, row_of = token_logprobs(model, batch, temperature=temperature)
    return [logp[row_of == i] for i in range(len(items))]


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 20)])
def test_sampling_logprobs_are_what_training_recomputes(temperature, top_k):
    """At the first inner step of a batch the new/old ratio is exp(0) = 1 for every token: the
    rollout's log-probs equal the training forward's (fp32, within 1e-5), LoRA active."""
    model = tiny(std=0.05)
    apply_lora(model, targets=["q_proj", "v_proj", "output"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)  # adapters that change the model
    gen = torch.Generator().manual_seed(0)
    out = rollout(model, PROMPTS, num_generations=3, max_new_tokens=12, temperature=temperature,
                  top_k=top_k, generator=gen, stop_ids=[7])
    want = _training_logprobs(model, list(zip(out.prompts, out.completions)), temperature)
    for got, ref in zip(out.logprobs, want):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref.detach(), atol=1e-5, rtol=0)
    assert len({tuple(c) for c in out.completions}) > len(PROMPTS)  # generations of a prompt differ


def test_sampling_is_reproducible_from_its_generator():
    model = tiny(std=0.05)
    first = rollout(model, PROMPTS, num_generations=4, max_new_tokens=10,
                    generator=torch.Generator().manual_seed(3))
    again = rollout(model, PROMPTS, num_generations=4, max_new_tokens=10,
                    generator=torch.Generator().manual_seed(3))
    other = rollout(model, PROMPTS, num_generations=4, max_new_tokens=10,
                    generator=torch.Generator().manual_seed(4))
    assert first.completions == again.completions
    assert first.completions != other.completions


def test_model_state_is_restored_and_bad_arguments_are_one_line():
    model = tiny().train()
    rollout(model, [[1, 2]], max_new_tokens=2)
    assert model.training and all(layer.attn.kv_cache is None for layer in model.layers)
    for kwargs, match in [({"num_generations": 0}, "num_generations"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            rollout(model, [[1, 2]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="at least one token"):
        rollout(model, [[1], []], max_new_tokens=2)


def test_a_prefill_into_the_cache_refuses_positions_past_it_and_needs_seq_lens():
    model = tiny()
    model.setup_caches(1, 4)
    tokens = torch.tensor([[5, 6, 7]])
    rows = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(ValueError, match="position 4 exceeds the KV cache of 4"):
            model(tokens, seq_lens=[3], cache_index=(rows, torch.tensor([2, 3, 4])), hidden_only=True)
        with pytest.raises(ValueError, match="pass seq_lens too"):
            model(tokens, cache_index=(rows, torch.tensor([0, 1, 2])), hidden_only=True)
        model(tokens, seq_lens=[3], cache_index=(rows, torch.tensor([1, 2, 3])), hidden_only=True)
    cache = model.layers[0].attn.kv_cache
    assert cache.k[0, :, 0].abs().sum() == 0 and cache.k[0, :, 1:].abs().sum() > 0  # written where told
    model.reset_caches()
