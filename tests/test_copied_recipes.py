"""Copied recipes are first-class: `tune cp` a shipped recipe, edit the copy as a user would
(text edits, no library change), `tune run` the copy, and find the edit's effect in what the
run wrote. The README's "Change the algorithm" edits are read from the README itself, so the
README cannot drift from what works.

References: the shipped recipe's own run with the same config (the loss term must change the
losses after step 1, when the weights first differ), and values recomputed from the written
files (perplexity = exp(loss); the reply lengths in predictions.jsonl)."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest

from tunewright.tune_cli.main import main as tune

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "save_every_n_steps=null",
        "max_steps=4", "batch_size=4"]


def readme_edits() -> list[tuple[str, str]]:
    """The (replace, with) code pairs of the README's "Change the algorithm" section."""
    text = README.read_text()
    blocks = re.findall(r"<!-- (replace|with) -->\n```python\n(.*?)```", text, flags=re.S)
    assert [kind for kind, _ in blocks] == ["replace", "with"] * (len(blocks) // 2) and blocks
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]


def edit(source: str, old: str, new: str) -> str:
    """Replace the lines of `old` (found by their stripped text, once) with `new`, indented as
    the lines they replace."""
    lines, want = source.splitlines(), [x.strip() for x in old.strip("\n").splitlines()]
    hits = [i for i in range(len(lines)) if [x.strip() for x in lines[i : i + len(want)]] == want]
    assert len(hits) == 1, f"{old!r} found {len(hits)} times"
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    replacement = textwrap.indent(textwrap.dedent(new.strip("\n")), indent).splitlines()
    return "\n".join(lines[:i] + replacement + lines[i + len(want):]) + "\n"


def copy_recipe(name: str, dest: Path) -> Path:
    assert tune(["cp", name, str(dest)]) == 0
    return dest


def readme_copy(dest: Path) -> Path:
    """A fresh copy of `sft` with the README's edits applied."""
    mine = copy_recipe("sft", dest)
    source = mine.read_text()
    for old, new in readme_edits():
        source = edit(source, old, new)
    mine.write_text(source)
    return mine


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


MODES = {
    "full": ["--config", "llama/tiny_full"],
    "lora": ["--config", "llama/tiny_lora", "save_final_model=false"],
    "fsdp-one-process": ["--config", "llama/tiny_lora_distributed", "save_final_model=false"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_the_readme_edits_change_the_loss_and_log_a_metric(tmp_path, mode):
    mine = readme_copy(tmp_path / "my_sft.py")
    shipped, edited = tmp_path / "shipped", tmp_path / "edited"
    assert tune(["run", "sft", *MODES[mode], f"output_dir={shipped}", *FAST]) == 0
    assert tune(["run", str(mine), *MODES[mode], f"output_dir={edited}", *FAST]) == 0
    rows = [r for r in metrics(edited) if "loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-6)
    assert "perplexity" not in metrics(shipped)[0]
    # Equal until a step with a non-zero learning rate has applied the L2 term's gradient (the
    # warm-up starts at lr 0), different from then on.
    want, got = losses(shipped), losses(edited)
    first_update = next(i for i, r in enumerate(rows) if r["lr"] > 0)
    assert got[: first_update + 1] == want[: first_update + 1]
    assert all(abs(a - b) > 1e-6 for a, b in zip(got[first_update + 1 :], want[first_update + 1 :]))
    assert first_update + 1 < len(got)


def test_a_copy_can_add_a_generation_phase_between_steps(tmp_path):
    mine = copy_recipe("sft", tmp_path / "my_sft.py")
    source = edit(mine.read_text(), "_, train, val = build_data(cfg)", "tokenizer, train, val = build_data(cfg)")
    source = edit(source, "if run.due(cfg.save_every_n_steps):", """
        if run.due(2):  # every 2 steps: a greedy sample of the model being trained
            from tunewright.training.generation import generate

            model.eval()
            [reply] = generate(model, tokenizer.encode("Reverse the string: abc", add_bos=True), max_new_tokens=5,
                               pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
            model.train()
            run.log(sample=tokenizer.decode(reply), sample_tokens=len(reply))
        if run.due(cfg.save_every_n_steps):""")
    mine.write_text(source)
    out = tmp_path / "run"
    assert tune(["run", str(mine), "--config", "llama/tiny_lora", f"output_dir={out}", *FAST]) == 0
    samples = [r for r in metrics(out) if "sample" in r]
    assert [r["step"] for r in samples] == [2, 4]
    assert all(r["sample_tokens"] == 5 and isinstance(r["sample"], str) for r in samples)
    assert len(losses(out)) == 4


def test_torchtunes_names_copy_the_same_recipe(tmp_path):
    for name in ("full_finetune_single_device", "lora_finetune_distributed"):
        dest = copy_recipe(name, tmp_path / f"{name}.py")
        assert dest.read_text() == (REPO / "recipes" / "sft.py").read_text()


def test_a_copied_evaluate_recipe_reports_a_new_metric(tmp_path):
    mine = copy_recipe("evaluate", tmp_path / "my_eval.py")
    mine.write_text(edit(mine.read_text(), 'result["time_s"] = round(time.perf_counter() - start, 1)', """
        result["reply_chars"] = sum(len(p["reply"]) for p in predictions)
        result["time_s"] = round(time.perf_counter() - start, 1)"""))
    out = tmp_path / "eval"
    assert tune(["run", str(mine), "--config", "llama/tiny_evaluate", f"output_dir={out}", "max_answers=5",
                 "max_new_tokens=4", "num_threads=1"]) == 0
    result = json.loads((out / "eval.json").read_text())
    replies = [json.loads(x)["reply"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(replies) == 5 and result["reply_chars"] == sum(map(len, replies))


def test_a_copied_generate_recipe_prints_a_new_metric(tmp_path, capsys):
    mine = copy_recipe("generate", tmp_path / "my_generate.py")
    ret = 'return {"text": text, "ids": ids, "prompt_ids": prompt_ids, "tokens_per_s": tokens_per_s}'
    mine.write_text(edit(mine.read_text(), ret, f"""
        print(f"distinct tokens: {{len(set(ids))}}")
        {ret}"""))
    capsys.readouterr()
    assert tune(["run", str(mine), "--config", "llama/tiny_generate", "max_new_tokens=6", "num_threads=1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^distinct tokens: [1-6]$", out, flags=re.M), out


@pytest.mark.slow
def test_an_edited_copy_runs_under_torchrun_like_one_device(tmp_path):
    from tests.dist_scripts.launch import torchrun

    mine = readme_copy(tmp_path / "my_sft.py")
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*FAST, "save_final_model=false"]
    assert tune(["run", str(mine), "--config", "llama/tiny_lora", f"output_dir={one}", *common]) == 0
    common = [c for c in common if not c.startswith("batch_size")] + ["batch_size=2"]
    torchrun(2, mine, ["--config", REPO / "configs" / "llama" / "tiny_lora_distributed.yaml", f"output_dir={two}",
                       *common])
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert [r["perplexity"] for r in metrics(two)] == pytest.approx([r["perplexity"] for r in metrics(one)], rel=1e-5)
