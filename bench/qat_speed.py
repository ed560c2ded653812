"""QAT's cost per training step: forward + backward of the same model plain and fake-quantized
(`training/quantize.py prepare_qat`), interleaved in one process, on the same batches.

    .venv/bin/python bench/qat_speed.py [--tokens 512 2048] [--repeats 5] [--scheme int8_dynamic_act_int4_weight]

The model has SmolLM2-135M's shape (random weights, fp32, from the registry's size table), the
loss is the recipes' (`causal_lm_loss`) on one row of `--tokens` tokens. Fake quantization
rounds every weight at every step (a cost that grows with the parameters) and, for the dynamic
scheme, every linear layer's input, per token, forward and backward (a cost that grows with the
tokens). Reports the median seconds per step of each and the slowdown, for each token count.
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


def smollm2_135m() -> torch.nn.Module:
    from tunewright.models import find_size
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model

    _, args = find_size("smollm2_135m")
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    return model


def step_seconds(model: torch.nn.Module, batch: dict) -> float:
    from tunewright.training.objectives import causal_lm_loss

    start = time.perf_counter()
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    from tunewright.training.quantize import prepare_qat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scheme", default="int8_dynamic_act_int4_weight")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    plain = smollm2_135m()
    qat = copy.deepcopy(plain)
    prepare_qat(qat, {"scheme": args.scheme, "group_size": 32})
    results = []
    for num_tokens in args.tokens:
        tokens = torch.randint(0, plain.args.vocab_size, (1, num_tokens))
        batch = {"tokens": tokens, "labels": tokens.roll(-1, 1)}  # one row, no padding
        times: dict[str, list[float]] = {"plain": [], "qat": []}
        for i in range(args.repeats + 1):  # the first round warms up
            for name, model in (("plain", plain), ("qat", qat)) if i % 2 else (("qat", qat), ("plain", plain)):
                t = step_seconds(model, batch)
                if i:
                    times[name].append(t)
        p, q = statistics.median(times["plain"]), statistics.median(times["qat"])
        results.append({"tokens": num_tokens, "plain_s": round(p, 3), "qat_s": round(q, 3),
                        "slowdown": round(q / p - 1, 3)})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"model": "SmolLM2-135M shape (random, fp32)", "scheme": args.scheme,
                      "threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
