"""`recipes/eleuther_eval.py` and our lm-eval model (`training/lm_eval_model.py`), offline.

The reference is lm-eval's own `HFLM` (transformers) on the same weights and local tasks:
accuracy, every log-likelihood, rolling windows and generated replies must match. Byte
perplexity is checked against exp(NLL / bytes) computed here from transformers' logits, and
exact match against replies from transformers' `generate`. The quickstart's merged model on the
shipped reasoning-gym task is in the slow tier (tests/test_quickstart.py runs it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bad_inputs.harness import assert_one_error_line, run_tune
from tunewright.training.tiny_assets import tiny_asset

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "configs" / "eval_tasks"
MAX_LENGTH = 512
TOL = 1e-4

MC_DOCS = [  # contexts of several lengths; one-letter choices share one forward (lm-eval's cache)
    {"question": "Pick a letter:", "choices": [" a", " b", " c"], "label": 1},
    {"question": "The colour of the sky on a clear day is", "choices": [" blue", " green", " red"], "label": 0},
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22", " four"], "label": 0},
    {"question": "A very long question " * 8 + "?", "choices": [" yes", " no"], "label": 1},
    {"question": "Reverse abc:", "choices": [" cba", " abc", " bca"], "label": 0},
    {"question": "Upper-case dog:", "choices": [" DOG", " dog"], "label": 0},
]
PROMPTS = ["Reverse the letters: abc\n", "Add 3 and 4.\n", "Write hello in capitals:", "Q: 7 - 2?\nA:",
           "Once upon a time", "x"]


def _write_task(folder: Path, name: str, spec: dict, rows: list[dict]) -> dict:
    from tunewright.training.lm_eval_model import load_task_file

    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}}, **spec}
    (folder / f"{name}.json").write_text(json.dumps(spec))
    return load_task_file(folder / f"{name}.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama whose vocabulary is exactly the tokenizer's (259 ids), so greedy
    generation cannot pick a padded id that only one side would exclude; weights drawn wider
    than HF's init so that greedy choices are clear-cut."""
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model, save_pretrained
    from tunewright.models.registry import get_family

    out = tmp_path_factory.mktemp("tiny_v259")
    args = dataclasses.replace(get_family("llama").tiny, vocab_size=259)
    model = build_model(args, device="cpu")
    init_weights(model, std=0.2, seed=3)
    save_pretrained(model, out, dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_asset("llama") / name, out / name)
    return out


@pytest.fixture(scope="module")
def hf(model_dir):
    from lm_eval.models.huggingface import HFLM

    # batch size 1: transformers' batched generation left-pads, which may move a near tie.
    return HFLM(pretrained=str(model_dir), tokenizer=str(model_dir), max_length=MAX_LENGTH, batch_size=1,
                device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ours(model_dir):
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.training.lm_eval_model import TunewrightLM, adds_bos

    return TunewrightLM(load_pretrained(model_dir), load_tokenizer(model_dir), batch_size=4,
                        max_length=MAX_LENGTH, add_bos=adds_bos(model_dir))


@pytest.fixture(scope="module")
def references(hf):
    """transformers' own greedy replies to PROMPTS (8 new tokens, cut at a newline)."""
    replies = []
    for prompt in PROMPTS:
        ids = hf.tokenizer(prompt, return_tensors="pt").input_ids
        new = hf.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        replies.append(hf.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0])
    return replies


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, references) -> list[dict]:
    from tunewright.training.lm_eval_model import load_task_file

    folder = tmp_path_factory.mktemp("tasks")
    mc = _write_task(folder, "t_mc", {
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}, MC_DOCS)
    # Every other row holds transformers' reply (right), the others a reply it did not give.
    rows = [{"prompt": p, "answer": r if i % 2 == 0 else r + "#"} for i, (p, r) in enumerate(zip(PROMPTS, references))]
    gen = _write_task(folder, "t_gen", {
        "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}, rows)
    return [mc, gen, load_task_file(SHIPPED / "tunewright_text_ppl.json")]


def _evaluate(lm, tasks: list[dict], **kwargs) -> dict:
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    saved = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda results: None  # runs `pip list`: seconds, irrelevant here
    try:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False),
                               bootstrap_iters=0, log_samples=True, **kwargs)
    finally:
        lm_eval.evaluator.add_env_info = saved


@pytest.fixture(scope="module")
def results(hf, ours, tasks) -> tuple[dict, dict]:
    return _evaluate(hf, tasks), _evaluate(ours, tasks)


def _resps(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_accuracy_and_loglikelihoods_equal_hflm(results):
    theirs, mine = results
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["t_mc"][metric] == theirs["results"]["t_mc"][metric]
    for a, b in zip(_resps(theirs, "t_mc"), _resps(mine, "t_mc"), strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip([x[0] for x in a], [x[0] for x in b], strict=True):
            assert ll_b == pytest.approx(ll_a, abs=TOL) and greedy_b == greedy_a
    for a, b in zip(_resps(theirs, "tunewright_text_ppl"), _resps(mine, "tunewright_text_ppl"), strict=True):
        assert b[0][0] == pytest.approx(a[0][0], abs=1e-3)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert mine["results"]["tunewright_text_ppl"][metric] == pytest.approx(
            theirs["results"]["tunewright_text_ppl"][metric], rel=1e-5)


def test_byte_perplexity_is_exp_of_nll_per_byte(results, hf):
    """Each document scored whole (it fits in MAX_LENGTH) after the eos prefix, by transformers."""
    _, mine = results
    docs = [json.loads(line)["text"] for line in (SHIPPED / "tunewright_text_ppl.jsonl").read_text().splitlines()]
    nll, num_bytes = 0.0, 0
    for doc in docs:
        ids = [hf.tokenizer.eos_token_id, *hf.tokenizer(doc).input_ids]
        assert len(ids) <= MAX_LENGTH
        with torch.no_grad():
            logprobs = torch.log_softmax(hf.model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        nll -= float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        num_bytes += len(doc.encode("utf-8"))
    assert mine["results"]["tunewright_text_ppl"]["byte_perplexity,none"] == pytest.approx(
        math.exp(nll / num_bytes), rel=1e-5)
    assert mine["results"]["tunewright_text_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / num_bytes / math.log(2), rel=1e-5)


def test_generate_until_replies_and_exact_match(results, references):
    theirs, mine = results
    replies = [s["filtered_resps"][0] for s in sorted(mine["samples"]["t_gen"], key=lambda s: s["doc_id"])]
    assert replies == references
    assert [s["filtered_resps"][0] for s in sorted(theirs["samples"]["t_gen"], key=lambda s: s["doc_id"])] == references
    right = sum(1 for i in range(len(PROMPTS)) if i % 2 == 0)
    assert mine["results"]["t_gen"]["exact_match,none"] == right / len(PROMPTS)


def test_rolling_windows_and_truncation_equal_hflm(hf, ours):
    """Short windows (each document cut into several) and contexts longer than the model's
    length (cut from the left), called directly on both models. The text repeats, so two of
    its windows hold the same tokens split differently between context and continuation:
    ours scores them in one forward (lm-eval's request grouping), HFLM at batch size 1 alone."""
    from lm_eval.api.instance import Instance

    text = "Rivers carry more than water. They move sand, gravel and dissolved minerals. " * 3
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "short", text[:77]])]
    pairs = [("", "Hello world"), ("x" * 60, " continuation"), ("Question: why?", " Because."), ("ab", "c")]
    single = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    hf._max_length = ours.max_length = 32
    try:
        theirs = hf.loglikelihood_rolling(rolling, disable_tqdm=True), hf.loglikelihood(single, disable_tqdm=True)
        mine = ours.loglikelihood_rolling(rolling), ours.loglikelihood(single)
    finally:
        hf._max_length = ours.max_length = MAX_LENGTH
    assert mine[0] == pytest.approx(theirs[0], abs=1e-3)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(theirs[1], mine[1], strict=True):
        assert ll_b == pytest.approx(ll_a, abs=TOL) and greedy_b == greedy_a


def test_generation_without_kv_cache_gives_the_same_replies(ours, references):
    from lm_eval.api.instance import Instance

    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8}), i)
                for i, p in enumerate(PROMPTS)]
    ours.enable_kv_cache = False
    try:
        assert ours.generate_until(requests) == references
    finally:
        ours.enable_kv_cache = True


def test_chat_template_renders_as_transformers(hf, ours):
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Calculate 4 - 1."}],
             [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "The answer is"}]]
    for chat, prompt in zip(chats, (True, False)):
        assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == \
            hf.apply_chat_template(chat, add_generation_prompt=prompt)
    assert ours.chat_template(True) == hf.tokenizer.chat_template


def test_bos_is_added_as_the_tokenizer_files_say(tmp_path):
    from tunewright.training.lm_eval_model import adds_bos

    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}]}
    cases = {"llama3": ({"post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}}, {}, True),
             "sentencepiece": ({"post_processor": None}, {"add_bos_token": True}, True),
             "smollm2": ({"post_processor": {"type": "ByteLevel"}}, {}, False),
             "off": ({"post_processor": template}, {"add_bos_token": False}, False)}
    for name, (tokenizer, config, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(tokenizer))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        assert adds_bos(tmp_path / name) is expected, name


def test_shipped_arithmetic_task_is_the_quickstarts_held_out_split():
    from tunewright.data.reasoning_gym import make_splits
    from tunewright.tune_cli import quickstart as q

    splits = make_splits(q.TASK, num_train=q.NUM_TRAIN, num_eval=q.NUM_EVAL, seed=q.SEED, task_config=q.TASK_CONFIG)
    shipped = [json.loads(line) for line in (SHIPPED / "tunewright_rg_arithmetic.jsonl").read_text().splitlines()]
    assert shipped == [{"question": r["messages"][-2]["content"], "answer": r["answer"]} for r in splits["eval"]]
    assert not {r["question"] for r in shipped} & {r["messages"][-2]["content"] for r in splits["train"]}


def test_tiny_config_runs_offline_and_writes_results(tmp_path):
    out = tmp_path / "eval"
    result = run_tune(["run", "eleuther_eval", "--config", "llama/tiny_eleuther_eval", f"output_dir={out}",
                       "limit=2", "num_threads=1"], cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    written = json.loads((out / "results.json").read_text())
    assert set(written["results"]) == {"tunewright_rg_arithmetic", "tunewright_text_ppl"}
    assert written["n-samples"]["tunewright_rg_arithmetic"]["effective"] == 2
    samples = (out / "samples_tunewright_rg_arithmetic.jsonl").read_text().splitlines()
    assert "<|im_start|>system\nReply with only the answer.<|im_end|>" in json.loads(samples[0])["arguments"][0][0]


@pytest.mark.parametrize("override, fragments", [
    ("tasks=[no_such_task_anywhere]", ["tasks: unknown task 'no_such_task_anywhere'", "tunewright_rg_arithmetic"]),
    ("model.path=/nonexistent/model", ["/nonexistent/model"]),
])
def test_bad_inputs_are_one_line(tmp_path, override, fragments):
    result = run_tune(["run", "eleuther_eval", "--config", "llama/tiny_eleuther_eval",
                       f"output_dir={tmp_path / 'eval'}", override], cwd=tmp_path)
    assert_one_error_line(result, fragments)
    assert not (tmp_path / "eval").exists()


def test_without_lm_eval_installed_it_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if absent
    result = run_tune(["run", "eleuther_eval", "--config", "llama/tiny_eleuther_eval",
                       f"output_dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert_one_error_line(result, ["pip install 'tunewright[eval]'"])


def check_quickstart_model(work_dir: Path, tuned_accuracy: float) -> None:
    """The quickstart's merged model on the shipped reasoning-gym task, as its users run it, is
    the model the quickstart's own evaluation scored: the same greedy reply to every held-out
    question and an exact match within rounding of its accuracy. Called by the slow quickstart
    test, which has just made the model (tests/test_quickstart.py)."""
    from tunewright.training.entry import run_recipe_file

    out = work_dir / "lm_eval"
    results = run_recipe_file(REPO / "recipes" / "eleuther_eval.py",
                              REPO / "configs" / "smollm2" / "135M_eleuther_eval_single_device.yaml",
                              [f"model.path={work_dir / 'lora' / 'merged'}", f"output_dir={out}"])
    samples = [json.loads(line) for line in (out / "samples_tunewright_rg_arithmetic.jsonl").read_text().splitlines()]
    replies = [s["filtered_resps"][0].strip() for s in sorted(samples, key=lambda s: s["doc_id"])]
    evaluated = [json.loads(line) for line in (work_dir / "eval_lora" / "predictions.jsonl").read_text().splitlines()]
    assert replies == [p["reply"] for p in evaluated]
    assert abs(results["results"]["tunewright_rg_arithmetic"]["exact_match,none"] - tuned_accuracy) <= 0.03
