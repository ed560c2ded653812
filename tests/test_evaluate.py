"""The evaluate recipe on the tiny config: the held-out loss equals a direct cross-entropy over
the target tokens, replies are scored right (known strings, and replies fed back as answers),
and an adapter evaluates the same as the merged model it was saved with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunewright.training.entry import import_recipe, run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "evaluate.py"
CONFIG = REPO / "configs" / "llama" / "tiny_evaluate.yaml"
FAST = ["num_threads=1", "max_new_tokens=4"]
evaluate = import_recipe(RECIPE)


def test_loss_equals_plain_cross_entropy_over_targets(tmp_path):
    overrides = [f"output_dir={tmp_path}", "max_answers=4", "batch_size=5", *FAST]
    result = run_recipe_file(RECIPE, CONFIG, overrides)
    assert json.loads((tmp_path / "eval.json").read_text()) == result

    from tunewright.data import sft_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained

    # The reference: each row alone, full logits, no chunking, no padding.
    model = load_pretrained(result["model"]).eval()
    tokenizer = load_tokenizer(result["model"], max_seq_len=512)
    data = sft_dataset(tokenizer, source=result["dataset"], split=result["split"], format="instruct",
                       max_seq_len=512)
    total, count = 0.0, 0
    with torch.no_grad():
        for item in data:
            logits = model(torch.tensor([item["tokens"]]))[0]
            labels = torch.tensor(item["labels"])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert result["num_targets"] == count and result["num_rows"] == len(data)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["num_scored"] == 4 and result["adapter"] is None


def test_known_replies_are_scored():
    assert evaluate.normalize("  The  Answer. ") == "the answer"
    row = {"answer": "Paris"}
    assert evaluate.exact_match("paris.", row) == 1.0
    assert evaluate.exact_match("Paris, France", row) == 0.0
    exact, name = evaluate.make_scorer(None, "output")
    assert name == "exact match" and exact(" ABC ", {"output": "abc"}) == 1.0

    score, name = evaluate.make_scorer("basic_arithmetic", "answer")
    assert name == "reasoning-gym basic_arithmetic"
    row = {"answer": "-28", "metadata": "{}"}
    assert score("-28", row) == 1.0
    assert score("-27", row) == 0.0
    assert 0.0 < score("It is -28", row) < 1.0  # reasoning-gym's partial credit: not correct
    renamed, _ = evaluate.make_scorer("basic_arithmetic", "output")
    assert renamed("-28", {"output": "-28"}) == 1.0


def _chat_rows(path: Path, answers: list[str]) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                          {"role": "assistant", "content": str(2 * i)}], "answer": a}
            for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _predictions(eval_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]


def test_accuracy_counts_replies_equal_to_the_answer(tmp_path):
    data = tmp_path / "rows.jsonl"
    _chat_rows(data, ["?"] * 6)
    overrides = [f"dataset.source={data}", "dataset.split=train", "dataset.format=chat",
                 "answer_column=answer", *FAST]
    first = run_recipe_file(RECIPE, CONFIG, [f"output_dir={tmp_path / 'a'}", *overrides])
    assert first["accuracy"] == 0.0 and first["num_scored"] == 6
    replies = [p["reply"] for p in _predictions(tmp_path / "a")]
    assert len(replies) == 6

    # Greedy decoding repeats itself: the same prompts give the same replies, so rows whose
    # answer is the model's own reply (every other one) are exactly the correct ones.
    _chat_rows(data, [r if i % 2 == 0 else r + "x" for i, r in enumerate(replies)])
    second = run_recipe_file(RECIPE, CONFIG, [f"output_dir={tmp_path / 'b'}", *overrides])
    assert (second["num_correct"], second["accuracy"]) == (3, 0.5)
    assert second["loss"] == pytest.approx(first["loss"], abs=0)  # the answer column is not trained text
    predictions = _predictions(tmp_path / "b")
    assert [p["score"] for p in predictions] == [1.0, 0.0] * 3
    assert predictions[0]["question"] == "Add 0 and 0."


def test_adapter_evaluates_like_the_merged_model(tmp_path):
    lora = REPO / "recipes" / "sft.py"
    run_recipe_file(lora, REPO / "configs" / "llama" / "tiny_lora.yaml",
                    [f"output_dir={tmp_path / 'run'}", "max_steps=3", "progress_bar=false", "num_threads=1",
                     "eval_every_n_steps=null", "save_every_n_steps=null", "save_final_model=true"])
    def loss_only(name: str, *extra: str) -> dict:
        return run_recipe_file(RECIPE, CONFIG, [f"output_dir={tmp_path / name}", "answer_column=null",
                                                *extra, *FAST])

    base = loss_only("base")
    with_adapter = loss_only("adapter", f"adapter={tmp_path / 'run' / 'adapter'}")
    merged = loss_only("merged", f"model.path={tmp_path / 'run' / 'merged'}")
    assert with_adapter["loss"] == pytest.approx(merged["loss"], rel=1e-5)
    assert with_adapter["loss"] < base["loss"]  # three steps of training on this data lower it
    assert "accuracy" not in base and not (tmp_path / "base" / "predictions.jsonl").exists()


def test_missing_answer_column_fails_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="no column 'answer'"):
        run_recipe_file(RECIPE, CONFIG, [f"output_dir={tmp_path}", "answer_column=answer", *FAST])
