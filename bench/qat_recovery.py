"""How much of post-training quantization's damage quantization-aware training recovers, and what
QAT costs per step, on SmolLM2-135M-Instruct and the quickstart's task, offline on the CPU.

    .venv/bin/python bench/qat_recovery.py [--steps 80] [--scheme int8_dynamic_act_int4_weight]

The model and data are the quickstart's (`tune quickstart` writes them: `out/quickstart/model`,
SmolLM2-135M-Instruct from its GGUF file, and reasoning-gym arithmetic rows in
`out/quickstart/data`). Two full fine-tunes from the same weights, on the same batches, steps,
lr schedule, fp32, 2 threads:

- sft (`recipes/sft.py`), then PTQ of its weights (`recipes/quantize.py`): held-out loss
  L_sft before and L_ptq after; Δ = L_ptq - L_sft is the damage of rounding;
- qat (`recipes/sft.py` with a `quantization:` node), converted: held-out loss L_qat of the quantized model (`evaluate`).

recovered = (L_ptq - L_qat) / Δ: the share of Δ that QAT wins back (torchtune's Llama-3-8B
tutorial: 42% of the perplexity degradation; torchao's README: 68%). The slowdown is the median
tokens/s of each run's steps after the first two, sft over qat (the runs are sequential, on a
machine other jobs may share: rerun before trusting a few percent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "out" / "quickstart"


def training_config(recipe: str, out: Path, args: argparse.Namespace) -> dict:
    rows = {"_component_": "tunewright.data.sft_dataset", "format": "chat", "max_seq_len": 64}
    cfg = {
        "recipe": recipe, "output_dir": str(out), "seed": 0, "device": "cpu", "dtype": "fp32", "num_threads": 2,
        "model": {"_component_": "tunewright.models.load_pretrained", "path": str(QUICKSTART / "model")},
        "tokenizer": {"_component_": "tunewright.data.tokenizer.load_tokenizer", "path": str(QUICKSTART / "model"),
                      "max_seq_len": 64},
        "dataset": {**rows, "source": str(QUICKSTART / "data" / "train.jsonl")},
        "val_dataset": {**rows, "source": str(QUICKSTART / "data" / "eval.jsonl")},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "tunewright.training.lr_schedule.cosine_with_warmup", "num_warmup_steps": 5},
        # Epochs enough for max_steps to decide (one epoch of the quickstart's 640 rows is 80 steps).
        "batch_size": 8, "epochs": 100, "max_steps": args.steps, "log_every_n_steps": 1, "eval_every_n_steps": args.steps,
        "save_final_model": True, "progress_bar": False,
    }
    if recipe == "qat":
        cfg["quantization"] = quantization(args)
        cfg["fake_quant_after_n_steps"] = args.fake_quant_after
    return cfg


def quantization(args: argparse.Namespace) -> dict:
    return {"scheme": args.scheme, "group_size": args.group_size, "embeddings": False}


def held_out() -> dict:
    """The tokenizer and the held-out rows that PTQ and the QAT export are both scored on."""
    return {
        "tokenizer": {"_component_": "tunewright.data.tokenizer.load_tokenizer", "path": str(QUICKSTART / "model"),
                      "max_seq_len": 64},
        "dataset": {"_component_": "tunewright.data.sft_dataset", "format": "chat", "max_seq_len": 64,
                    "source": str(QUICKSTART / "data" / "eval.jsonl")},
    }


def run(recipe: str, cfg: dict, work: Path) -> object:
    from tunewright.training.entry import run_recipe_file

    path = work / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # QAT is sft with a `quantization:` node (`qat` is sft's alias in `tune run`).
    return run_recipe_file(REPO / "recipes" / f"{'sft' if recipe == 'qat' else recipe}.py", path, [])


def tokens_per_second(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in rows if "tokens_per_second" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--scheme", default="int8_dynamic_act_int4_weight")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--fake-quant-after", type=int, default=None)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="take sft and PTQ from an earlier run in --work-dir (same steps and lr): only QAT runs")
    args = parser.parse_args()
    if not (QUICKSTART / "model" / "config.json").is_file():
        sys.exit(f"{QUICKSTART / 'model'}: missing; run `tune quickstart` first (it writes the model and data)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="qat_recovery_"))
    work.mkdir(parents=True, exist_ok=True)

    ptq_file = work / "ptq.json"
    if args.reuse and ptq_file.is_file():
        ptq = json.loads(ptq_file.read_text())
    else:
        ptq = sft_then_ptq(work, args)
        ptq_file.write_text(json.dumps({k: ptq[k] for k in ("loss_before", "loss_after")}))
    qat_dir = f"qat_after{args.fake_quant_after}" if args.fake_quant_after is not None else "qat"
    run("qat", training_config("qat", work / qat_dir, args), work)
    qat = run("evaluate", {
        "recipe": "evaluate", "output_dir": str(work / f"eval_{qat_dir}"), "device": "cpu", "dtype": "fp32",
        "num_threads": 2,
        "model": {"_component_": "tunewright.training.quantize.load_quantized",
                  "path": str(work / qat_dir / "quantized")},
        **held_out(),
        "answer_column": None,
    }, work)

    l_sft, l_ptq, l_qat = ptq["loss_before"], ptq["loss_after"], qat["loss"]
    delta = l_ptq - l_sft
    sft_tps, qat_tps = tokens_per_second(work / "sft"), tokens_per_second(work / qat_dir)
    result = {
        "model": "SmolLM2-135M-Instruct", "scheme": args.scheme, "group_size": args.group_size, "steps": args.steps,
        "lr": args.lr, "fake_quant_after_n_steps": args.fake_quant_after,
        "held_out_loss": {"sft": l_sft, "sft_then_ptq": l_ptq, "qat_converted": l_qat},
        "ptq_delta": delta, "recovered": (l_ptq - l_qat) / delta if delta > 0 else None,
        "tokens_per_second": {"sft": sft_tps, "qat": qat_tps}, "qat_slowdown": sft_tps / qat_tps - 1,
        "work_dir": str(work),
    }
    print(json.dumps(result, indent=2))


def sft_then_ptq(work: Path, args: argparse.Namespace) -> dict:
    """The baseline: sft, then PTQ of its weights; the quantize recipe's held-out losses."""
    run("sft", training_config("sft", work / "sft", args), work)
    return run("quantize", {
        "recipe": "quantize", "output_dir": str(work / "ptq"), "device": "cpu", "dtype": "fp32", "num_threads": 2,
        "model": {"_component_": "tunewright.models.load_pretrained", "path": str(work / "sft" / "final")},
        "quantization": quantization(args),
        **held_out(),
    }, work)


if __name__ == "__main__":
    main()
