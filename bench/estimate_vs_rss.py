"""`tune estimate`'s CPU total against the peak RSS a real run reaches above its start-up.

    .venv/bin/python bench/estimate_vs_rss.py [--steps 3] [--only tiny_full,...] [--phases]

Each case runs the sft recipe in a fresh subprocess, with packed rows so every micro-batch
holds exactly batch_size x max_seq_len tokens (the estimate's assumption). "Start-up" is the
process's RSS (VmRSS) after torch, tunewright, the recipe and the modules its `main` imports
(with `datasets`, `torch._dynamo` and torchao, which the run imports on first use) are imported
and the config is loaded and validated, just before `main(cfg)`: no model, data or tokenizer
exists yet. The peak is the largest `peak_rss_mb` (ru_maxrss) the run logs over its
steps (step 2 on has the optimizer state). Measured = peak - start-up; the estimate is
`training/estimate`'s peak for the same config in this process: the larger of its training
total and its loading phase (the weights as read plus the checkpoint file's mapped pages), both with
the CPU runtime term (code pages first touched, the live data set, tokenizer and set-up). The free
memory glibc keeps in its heap (what the set-up freed, what backward freed) is in the measured
figure; no term models it (the "backward buffers" term, fitted on the CPU, covers part). `--phases` shows where
the RSS grows (BENCHMARKS.md).

Cases: full, LoRA and QLoRA of the tiny Llama and of a random model of SmolLM2-135M's shape
(made once under /tmp, with the tiny byte tokenizer), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOL_DIR = Path("/tmp/tunewright-bench/smollm2_135m_random")

CHILD = r"""
import importlib, json, sys
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import torch
from tunewright.training.entry import import_recipe, load_recipe_config
module = import_recipe(sys.argv[1])
cfg = load_recipe_config(module, sys.argv[2], sys.argv[3:])
for name in ("batching", "data_setup", "instantiate", "lora_setup", "objectives", "offload", "optim",
             "optim_in_backward", "placement", "run", "setup", "state", "estimate", "estimate.terms"):
    importlib.import_module(f"tunewright.training.{name}")
for name in ("tunewright.modules.peft.qlora", "tunewright.data", "tunewright.data.tokenizer", "datasets",
             "torch._dynamo", "torchao"):
    importlib.import_module(name)
start = rss_mb()
if __import__("os").environ.get("PHASES"):  # --phases: RSS around each phase of the run
    import ctypes, functools
    class MallInfo2(ctypes.Structure):  # glibc >= 2.33: fordblks = bytes free inside malloc's heap
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                    "fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    def status():
        d = {k: int(v.split()[0]) / 1024 for k, v in (x.split(":", 1) for x in open("/proc/self/status"))
             if k in ("VmRSS", "RssAnon", "RssFile")}
        free = libc.mallinfo2().fordblks / 2**20
        return (f"rss {d['VmRSS'] - start:+7.1f}  anon {d['RssAnon']:7.1f}  file {d['RssFile']:7.1f}  "
                f"heap free {free:6.1f}")
    def wrap(owner, attr, label):
        f = getattr(owner, attr)
        @functools.wraps(f)
        def g(*a, **k):
            print(f"PHASE before {label:<16} {status()}", flush=True)
            out = f(*a, **k)
            print(f"PHASE after  {label:<16} {status()}", flush=True)
            return out
        setattr(owner, attr, g)
    from tunewright.training import data_setup, objectives, optim, placement
    for owner, attr, label in ((data_setup, "build_data", "data"), (placement.Placement, "load_model", "model"),
                               (optim, "build_optimizer", "optimizer"), (objectives, "causal_lm_loss", "forward"),
                               (torch.Tensor, "backward", "backward"), (optim, "optimizer_step", "step")):
        wrap(owner, attr, label)
history = module.main(cfg)
print("RESULT " + json.dumps({"startup_mb": start, "peak_mb": max(r["peak_rss_mb"] for r in history)}))
"""


def smollm2_dir() -> Path:
    """A random SmolLM2-135M-shaped model in Hugging Face format with the tiny tokenizer."""
    if (SMOL_DIR / "model.safetensors").is_file() and "49152" in (SMOL_DIR / "config.json").read_text():
        return SMOL_DIR
    import shutil

    from tunewright.models import find_size, save_pretrained
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model
    from tunewright.training.tiny_assets import tiny_asset

    _, args = find_size("smollm2_135m")
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    save_pretrained(model, SMOL_DIR, dtype="fp32", overwrite=True)  # config.json from the shape
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_asset("llama") / name, SMOL_DIR / name)
    return SMOL_DIR


def cases(steps: int) -> dict[str, tuple[str, list[str]]]:
    common = ["dataset.packed=true", f"max_steps={steps}", "eval_every_n_steps=null", "save_every_n_steps=null",
              "~val_dataset", "save_final_model=false", "progress_bar=false", "overwrite_output_dir=true",
              "log_every_n_steps=1"]
    tiny = ["batch_size=8", "tokenizer.max_seq_len=512"]
    smol = [f"model.path={SMOL_DIR}", "batch_size=1", "tokenizer.max_seq_len=256"]
    lora = ["save_adapter=false"]
    return {
        "tiny_full": ("llama/tiny_full", common + tiny),
        "tiny_lora": ("llama/tiny_lora", common + tiny + lora),
        "tiny_qlora": ("llama/tiny_lora", common + tiny + lora + ["quantize_base=true"]),
        "smollm2_full": ("llama/tiny_full", common + smol),
        "smollm2_lora": ("llama/tiny_lora", common + smol + lora),
        "smollm2_qlora": ("llama/tiny_lora", common + smol + lora + ["quantize_base=true"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--phases", action="store_true",
                        help="print the RSS above start-up, anonymous and file-backed MiB and the free MiB "
                             "glibc keeps in its heap around each phase")
    opts = parser.parse_args()

    from tunewright.training.entry import import_recipe, load_recipe_config
    from tunewright.training.estimate.terms import estimate
    from tunewright.tune_cli.catalog import find_config

    smollm2_dir()
    recipe = REPO / "recipes" / "sft.py"
    rows = []
    for name, (config, overrides) in cases(opts.steps).items():
        if opts.only and name not in opts.only.split(","):
            continue
        path = find_config(config)[0]
        overrides = [*overrides, f"output_dir=/tmp/tunewright-bench/{name}"]
        est = estimate(load_recipe_config(import_recipe(recipe), path, overrides))
        env = {**os.environ, **({"PHASES": "1"} if opts.phases else {})}
        done = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(path), *overrides],
                              capture_output=True, text=True, cwd=REPO, env=env)
        for phase in (x for x in done.stdout.splitlines() if x.startswith("PHASE ")):
            print(f"{name}: {phase}", flush=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        got = json.loads(line[len("RESULT "):])
        measured = got["peak_mb"] - got["startup_mb"]
        estimated = est.peak / 2**20  # the larger of the training total and the loading phase
        terms = {t.name: round(t.bytes / 2**20, 1) for t in est.terms} | {"(loading)": round(est.loading / 2**20, 1)}
        row = {"case": name, "estimate_mb": round(estimated, 1), "measured_mb": round(measured, 1),
               "error_pct": round(100 * (estimated - measured) / measured, 1),
               "startup_mb": round(got["startup_mb"], 1), "peak_mb": got["peak_mb"], "terms_mb": terms}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| case | estimate MiB | measured MiB (peak - start-up) | error |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['estimate_mb']} | {r['measured_mb']} | {r['error_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
