"""Rollout throughput: `training/rollout.py` against transformers' `generate` on the same batch.

    .venv/bin/python bench/rollout_vs_hf.py --repeats 3
    .venv/bin/python bench/rollout_vs_hf.py --repeats 3 --model out/quickstart/model --prompts 4 --generations 8

A random model of the SmolLM2-135M shape (30 layers, dim 576, 9/3 heads, vocab 49,152, tied),
the same weights in both stacks; `--prompts` prompts of different lengths x `--generations`
samples each, `--new-tokens` new tokens per row (no stop token, so both make exactly as many),
temperature 1, fp32. transformers gets the prompts left-padded with an attention mask and
`num_return_sequences`, as TRL's GRPOTrainer calls it. Interleaved: ours, theirs, ours, ...;
prints tokens/s per run and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="ours with `compile: true` (each block torch.compiled, as the recipes' option does; "
                             "the warm-up run pays the compilation); transformers eager, as TRL calls it")
    parser.add_argument("--model", default=None,
                        help="a real checkpoint directory (e.g. out/quickstart/model): its weights, the GRPO demo "
                             "config's prompts (3-shot arithmetic) and its stop ids, in both stacks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return real_model(args)

    import transformers

    from tunewright.models import load_pretrained
    from tunewright.training.rollout import rollout

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_pretrained(Path(tmp), dtype="fp32").eval()
    maybe_compile(ours, args)

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist()
               for n in torch.linspace(24, 96, args.prompts)]
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new_tokens = args.prompts * args.generations * args.new_tokens

    def run_ours() -> float:
        start = time.perf_counter()
        out = rollout(ours, prompts, num_generations=args.generations, max_new_tokens=args.new_tokens,
                      temperature=1.0, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        assert sum(map(len, out.completions)) == new_tokens
        return new_tokens / seconds

    def run_theirs() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(padded, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              num_return_sequences=args.generations, pad_token_id=0, eos_token_id=None)
        seconds = time.perf_counter() - start
        assert out.shape == (args.prompts * args.generations, width + args.new_tokens)
        return new_tokens / seconds

    interleaved(run_ours, run_theirs, args.repeats,
                f"{args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens, "
                f"prompts {len(prompts[0])}-{width} tokens, {args.threads} threads")


def maybe_compile(model: torch.nn.Module, args: argparse.Namespace) -> None:
    if args.compile:
        from tunewright.training.transforms import compile_blocks

        compile_blocks(model)


def interleaved(run_ours, run_theirs, repeats: int, what: str) -> None:
    """A warm-up of each, then ours, theirs, ours, ... `repeats` times; prints each and the medians."""
    run_ours(), run_theirs()
    figures: dict[str, list[float]] = {"tunewright": [], "transformers": []}
    for rep in range(repeats):
        figures["tunewright"].append(run_ours())
        figures["transformers"].append(run_theirs())
        print(f"run {rep + 1}: tunewright {figures['tunewright'][-1]:.0f} tok/s, "
              f"transformers {figures['transformers'][-1]:.0f} tok/s", flush=True)
    ours_median, theirs_median = (statistics.median(v) for v in figures.values())
    print(f"median: tunewright {ours_median:.0f} tok/s, transformers {theirs_median:.0f} tok/s, "
          f"ratio {ours_median / theirs_median:.2f}x ({what})")


def real_model(args: argparse.Namespace) -> None:
    """The GRPO demo's own rollout: the real model, its prompts, temperature 1, rows ending at a
    stop id (ours drops finished rows; transformers keeps them in the batch, padding). Tokens
    counted are each row's own, up to and including its stop id, in both stacks."""
    import transformers

    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.training.config import load_config, to_dict
    from tunewright.training.instantiate import instantiate
    from tunewright.training.rollout import rollout
    from tunewright.tune_cli.catalog import configs

    tokenizer = load_tokenizer(args.model)
    cfg = to_dict(load_config(configs()["smollm2/135M_grpo_lora_single_device"], [f"model.path={args.model}"]))
    data = instantiate({**cfg["dataset"], "size": args.prompts}, tokenizer=tokenizer)
    prompts = [item["prompt_ids"] for item in data.items]
    stops = sorted(tokenizer.stop_ids)
    ours = load_pretrained(args.model, dtype="fp32").eval()
    maybe_compile(ours, args)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    pad = tokenizer.pad_id
    padded = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run_ours() -> float:
        start = time.perf_counter()
        out = rollout(ours, prompts, num_generations=args.generations, max_new_tokens=args.new_tokens,
                      temperature=1.0, stop_ids=stops, generator=torch.Generator().manual_seed(0),
                      vocab_size=tokenizer.vocab_size)
        return sum(map(len, out.completions)) / (time.perf_counter() - start)

    def run_theirs() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(padded, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=args.new_tokens, num_return_sequences=args.generations,
                              pad_token_id=pad, eos_token_id=stops)
        seconds = time.perf_counter() - start
        tokens = 0
        for row in out[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            tokens += ends[0] + 1 if ends else len(row)
        return tokens / seconds

    interleaved(run_ours, run_theirs, args.repeats,
                f"real model {args.model}, GRPO demo prompts {min(map(len, prompts))}-{width} tokens, {args.prompts} "
                f"prompts x {args.generations} generations, up to {args.new_tokens} new tokens, stop ids {stops}, "
                f"{args.threads} threads")


if __name__ == "__main__":
    main()
