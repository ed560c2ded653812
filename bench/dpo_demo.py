"""DPO demo, offline on the CPU: SmolLM2-135M-Instruct learns to prefer right answers.

    .venv/bin/python bench/dpo_demo.py [--work-dir out/dpo_demo] [--kinds near,sign,ten]

1. model: SmolLM2-135M-Instruct from the GGUF file the quickstart uses (`tune quickstart`'s
   conversion, reused when `DIR/model` exists);
2. data: reasoning-gym `basic_arithmetic` with one-digit numbers (0-10, + and -) as preference
   pairs, chosen = the right answer, rejected = a corrupted one (`--kinds`: off by 1 or 2, the
   sign flipped, or off by 10; `near`, off by 1 or 2, is the hard kind: telling 7 from 8 needs
   the exact sum, which 36 steps of a 135M model did not learn, 0.51 -> 0.65), two pairs per question; the held-out questions share none with
   train, and both splits go through the same corruption process. The prompt holds one worked
   example (a two-digit sum, outside the task's range) so that the base model already replies
   with a bare number, which is what the exact-answer scorer reads;
3. before: held-out preference accuracy (the share of pairs where the model gives the right
   answer the higher log-probability, overall and per corruption kind), the mean log-prob
   margin, and the exact-answer accuracy of greedy replies (`recipes/evaluate.py`,
   reasoning-gym's scorer);
4. DPO with LoRA (`recipes/dpo.py`, config `smollm2/135M_dpo_lora_quickstart`): the reference
   is the same model with its adapters disabled;
5. after: the same measurements with the adapter; a table and `DIR/summary.json`.

Seeds and the thread count are fixed, so the figures repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = "smollm2/135M_dpo_lora_quickstart"
TASK = "basic_arithmetic"
TASK_CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
               "allow_parentheses": False, "allow_negation": False}  # 242 distinct questions
SYSTEM_PROMPT = "Reply with only the answer."
# One worked example before each question: without it the base model explains ("To calculate
# 4 - 1, we need...") and scores 0 whatever it knows. Two-digit, so never a task question.
EXAMPLE = [{"role": "user", "content": "Calculate 12 + 25."}, {"role": "assistant", "content": "37"}]
NUM_TRAIN, NUM_EVAL, PAIRS_PER_QUESTION, SEED = 144, 50, 2, 0
OWN_SAMPLES = 8  # --rejected own: replies sampled per question to find the model's own wrong ones
KINDS = ("near", "sign", "ten")  # what --kinds may name
CHOSEN_KINDS = KINDS


def corrupt(value: int, kind: str, rng: random.Random) -> int:
    """A wrong answer of one kind (it may equal `value`: the caller draws again)."""
    if kind == "near":
        return value + rng.choice([-2, -1, 1, 2])
    if kind == "sign":
        return -value
    return value + rng.choice([-10, 10])


def wrong_answers(answer: str, rng: random.Random) -> list[tuple[str, str]]:
    """PAIRS_PER_QUESTION distinct (kind, wrong answer), the kinds drawn at random."""
    value, found = int(answer), {}
    while len(found) < PAIRS_PER_QUESTION:
        kind = rng.choice(CHOSEN_KINDS)
        wrong = corrupt(value, kind, rng)
        if wrong != value and str(wrong) not in found:
            found[str(wrong)] = kind
    return [(kind, wrong) for wrong, kind in found.items()]


def own_wrong_answers(model_dir: Path, rows: list[dict], rng: random.Random) -> list[list[tuple[str, str]]]:
    """Per row, PAIRS_PER_QUESTION distinct wrong replies the base model itself samples
    (temperature 1, OWN_SAMPLES per question, scored by reasoning-gym's scorer), as (kind, reply):
    `own number` for a bare wrong number, `own text` for anything else; a question the model
    got right every time takes corruptions (their kinds) for what it lacks."""
    import torch

    from tunewright.data.reasoning_gym import score_fn
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.training.generation import strip_stop
    from tunewright.training.rollout import rollout

    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir).eval()
    score = score_fn(TASK)
    prompts = [tokenizer.tokenize_messages(row["messages"][:-1], add_generation_prompt=True)[0] for row in rows]
    out = rollout(model, prompts, num_generations=OWN_SAMPLES, max_new_tokens=12, temperature=1.0,
                  stop_ids=tokenizer.stop_ids, generator=torch.Generator().manual_seed(SEED),
                  vocab_size=tokenizer.vocab_size)
    found = []
    for i, row in enumerate(rows):
        wrong: dict[str, str] = {}
        for ids in out.completions[i * OWN_SAMPLES:(i + 1) * OWN_SAMPLES]:
            reply = tokenizer.decode(strip_stop(ids, tokenizer.stop_ids)).strip()
            if reply and reply not in wrong and score(reply, row) < 1:
                wrong[reply] = "own number" if reply.lstrip("-").isdigit() else "own text"
        picked = list(wrong.items())[:PAIRS_PER_QUESTION]
        for kind, corrupted in wrong_answers(row["answer"], rng):
            if len(picked) < PAIRS_PER_QUESTION and corrupted not in wrong:
                picked.append((corrupted, kind))
        found.append([(kind, reply) for reply, kind in picked])
    return found


def write_pairs(work: Path, model_dir: Path, rejected: str) -> dict[str, Path]:
    """`train_pairs.jsonl`, `eval_pairs.jsonl` (TRL's conversational form, plus each pair's
    rejected `kind`) and `eval.jsonl` (chat rows for the evaluate recipe)."""
    from tunewright.data.reasoning_gym import make_splits
    from tunewright.training.atomic import atomic_write_text

    splits = make_splits(TASK, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=SEED, task_config=TASK_CONFIG,
                         system_prompt=SYSTEM_PROMPT)
    rng = random.Random(SEED)
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        for row in rows:  # [system, user, assistant] -> [system, example, user, assistant]
            row["messages"][1:1] = EXAMPLE
        if rejected == "own":
            wrongs = own_wrong_answers(model_dir, rows, rng)
        else:
            wrongs = [wrong_answers(row["answer"], rng) for row in rows]
        pairs = [{"prompt": row["messages"][:-1], "chosen": [{"role": "assistant", "content": row["answer"]}],
                  "rejected": [{"role": "assistant", "content": wrong}], "kind": kind}
                 for row, row_wrongs in zip(rows, wrongs) for kind, wrong in row_wrongs]
        files[f"{split}_pairs"] = out / f"{split}_pairs.jsonl"
        atomic_write_text(files[f"{split}_pairs"], "".join(json.dumps(p) + "\n" for p in pairs))
    files["eval"] = out / "eval.jsonl"
    atomic_write_text(files["eval"], "".join(json.dumps(r) + "\n" for r in splits["eval"]))
    return files


def preference(model_dir: Path, pairs: Path, adapter: Path | None) -> dict[str, Any]:
    """Held-out: share of pairs whose chosen answer has the higher log-prob (overall and per
    corruption kind), mean log-prob margin."""
    import torch

    from tunewright.data.preference import collate_pairs, preference_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.peft_adapter import load_peft_adapter
    from tunewright.training.objectives import sequence_logprobs

    tokenizer = load_tokenizer(model_dir)
    dataset = preference_dataset(tokenizer, source=str(pairs))
    kinds = [json.loads(line)["kind"] for line in pairs.read_text().splitlines()]
    assert len(kinds) == len(dataset), "no pair is dropped at these lengths"
    model = load_pretrained(model_dir).eval()
    if adapter is not None:
        load_peft_adapter(model, adapter)
    margins = []
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            logps, _ = sequence_logprobs(model, collate_pairs(items, pad_id=tokenizer.pad_id, padding_free=True))
            margins.append(logps[: len(items)] - logps[len(items):])
    margin = torch.cat(margins)
    right = (margin > 0).double()
    per_kind = {kind: round(float(right[[i for i, k in enumerate(kinds) if k == kind]].mean()), 3)
                for kind in sorted(set(kinds))}
    return {"accuracy": float(right.mean()), "margin": float(margin.mean()), "accuracy_by_kind": per_kind}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="out/dpo_demo")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"corruptions of the rejected answers, of {KINDS}")
    parser.add_argument("--rejected", choices=("corrupted", "own"), default="corrupted",
                        help="rejected answers: corruptions of the right one (--kinds), or the base model's own "
                             "wrong replies")
    parser.add_argument("overrides", nargs="*", help="config overrides for the DPO run (key=value), e.g. rpo_alpha=0")
    args = parser.parse_args()
    global CHOSEN_KINDS
    CHOSEN_KINDS = tuple(k for k in args.kinds.split(",") if k)
    if not CHOSEN_KINDS or set(CHOSEN_KINDS) - set(KINDS):
        parser.error(f"--kinds: a comma-separated subset of {', '.join(KINDS)}")
    work = Path(args.work_dir)
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import run_recipe_file
    from tunewright.tune_cli.catalog import configs, recipes
    from tunewright.tune_cli.quickstart import _convert, _evaluate

    def stage(title: str) -> None:
        print(f"\n== {title} (at {time.perf_counter() - start:.0f} s)", flush=True)

    stage("model")
    model_dir = _convert(work / "model")
    stage("data")
    files = write_pairs(work, model_dir, args.rejected)
    overrides = [f"model.path={model_dir}", f"dataset.source={files['train_pairs']}", f"output_dir={work / 'dpo'}",
                 "overwrite_output_dir=true", *args.overrides]
    train_cfg = to_dict(load_config(configs()[CONFIG], overrides))
    # the evaluate recipe reads chat rows with the training config's model and tokenizer
    eval_cfg = {**train_cfg, "dataset": {"_component_": "tunewright.data.sft_dataset", "source": str(files["eval"]),
                                         "format": "chat"}}

    stage("before: held-out preference and exact-answer accuracy")
    before = {**preference(model_dir, files["eval_pairs"], None),
              "exact": _evaluate(eval_cfg, files["eval"], work / "eval_base", adapter=None)["accuracy"]}
    print(f"base: {before}", flush=True)
    stage("DPO with LoRA")
    print(f"tune run dpo --config {CONFIG} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    history = run_recipe_file(recipes()["dpo"], configs()[CONFIG], overrides)
    train_s = time.perf_counter() - t0
    stage("after")
    adapter = work / "dpo" / "adapter"
    after = {**preference(model_dir, files["eval_pairs"], adapter),
             "exact": _evaluate(eval_cfg, files["eval"], work / "eval_dpo", adapter=adapter)["accuracy"]}
    print(f"after DPO: {after}", flush=True)
    steps = [r for r in history if "loss" in r]

    seconds = time.perf_counter() - start
    rows = [("", "base", "after DPO"),
            ("held-out preference accuracy", f"{before['accuracy']:.2f}", f"{after['accuracy']:.2f}"),
            *((f"  rejected = {kind}", f"{before['accuracy_by_kind'][kind]:.2f}",
               f"{after['accuracy_by_kind'][kind]:.2f}") for kind in before["accuracy_by_kind"]),
            ("held-out log-prob margin", f"{before['margin']:+.2f}", f"{after['margin']:+.2f}"),
            ("exact-answer accuracy", f"{before['exact']:.2f}", f"{after['exact']:.2f}")]
    print(f"\nSmolLM2-135M-Instruct, DPO (LoRA) on reasoning-gym arithmetic pairs: {NUM_TRAIN} train and "
          f"{NUM_EVAL} held-out questions, {PAIRS_PER_QUESTION} pairs each\n")
    for row in rows:
        print("  " + "   ".join(cell.ljust(30 if i == 0 else 10) for i, cell in enumerate(row)).rstrip())
    tokens = sum(r["num_tokens"] for r in steps)  # the logged steps' (every log_every_n_steps-th)
    step_time = sum(r["step_time"] for r in steps)
    print(f"\nDPO: {steps[-1]['step']} steps in {train_s:.0f} s ({tokens / step_time:.0f} tokens/s over the logged "
          f"steps); train reward accuracy / margin: "
          + ", ".join(f"step {r['step']}: {r['accuracy']:.2f} / {r['margin']:+.2f}" for r in steps))
    cpu_s = time.process_time() - cpu_start
    print(f"total {seconds:.0f} s wall, {cpu_s:.0f} CPU-s; load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    summary = {"before": before, "after": after, "train_seconds": round(train_s, 1), "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu_s, 1), "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
               "train_tokens_per_second": round(tokens / step_time, 1), "train_log": steps,
               "num_train_questions": NUM_TRAIN, "num_eval_questions": NUM_EVAL,
               "pairs_per_question": PAIRS_PER_QUESTION, "kinds": list(CHOSEN_KINDS),
               "overrides": args.overrides, "rejected": args.rejected}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
