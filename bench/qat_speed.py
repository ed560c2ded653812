"""QAT's cost per training step: forward + backward of the same model plain and fake-quantized
(`training/quantize.py prepare_qat`), interleaved in one process, on the same batches.

    .venv/bin/python bench/qat_speed.py [--tokens 512 2048] [--repeats 5] [--scheme int8_dynamic_act_int4_weight]
                                        [--dtype fp32|bf16] [--torchao]

The model has SmolLM2-135M's shape (random weights, fp32, from the registry's size table), the
loss is the recipes' (`causal_lm_loss`) on one row of `--tokens` tokens. Fake quantization
rounds every weight at every step (a cost that grows with the parameters) and, for the dynamic
scheme, every linear layer's input, per token, forward and backward (a cost that grows with the
tokens). Reports the median seconds per step of each and the slowdown, for each token count
(and the slowdown of the fastest rounds: on a shared machine other jobs only ever add time).
`--torchao` also times the same prepared model with torchao's own fake quantizers (what
training/fake_quant.py replaces) in the same interleaved rounds: the before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def smollm2_135m(dtype: torch.dtype) -> torch.nn.Module:
    from tunewright.models import find_size
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model

    _, args = find_size("smollm2_135m")
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    return model.to(dtype)


def step_seconds(model: torch.nn.Module, batch: dict) -> float:
    from tunewright.training.objectives import causal_lm_loss

    start = time.perf_counter()
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    from tunewright.training.fake_quant import use_torchao_fake_quantizers
    from tunewright.training.quantize import prepare_qat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scheme", default="int8_dynamic_act_int4_weight")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--torchao", action="store_true", help="also time torchao's own fake quantizers")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    plain = smollm2_135m({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    qat = copy.deepcopy(plain)
    prepare_qat(qat, {"scheme": args.scheme, "group_size": 32})
    models = {"plain": plain, "qat": qat}
    if args.torchao:
        models["qat_torchao"] = copy.deepcopy(qat)
        use_torchao_fake_quantizers(models["qat_torchao"])
    results = []
    for num_tokens in args.tokens:
        tokens = torch.randint(0, plain.args.vocab_size, (1, num_tokens))
        batch = {"tokens": tokens, "labels": tokens.roll(-1, 1)}  # one row, no padding
        times: dict[str, list[float]] = {name: [] for name in models}
        warmup = 0 if results else 1  # a first round warms up; later token counts find the models warm
        for i in range(args.repeats + warmup):
            order = list(models.items())
            for name, model in order[i % len(order):] + order[:i % len(order)]:  # each goes first in turn
                t = step_seconds(model, batch)
                if i >= warmup:
                    times[name].append(t)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        fastest = {name: min(ts) for name, ts in times.items()}  # other jobs only ever add time
        row = {"tokens": num_tokens, **{f"{name}_s": round(t, 3) for name, t in median.items()}}
        for name in models:
            if name != "plain":
                row[f"{name}_slowdown"] = round(median[name] / median["plain"] - 1, 3)
                row[f"{name}_slowdown_of_fastest"] = round(fastest[name] / fastest["plain"] - 1, 3)
        results.append(row)
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"model": f"SmolLM2-135M shape (random, {args.dtype})", "scheme": args.scheme,
                      "threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
