"""Reward functions (training/rewards.py) and GRPO prompts (data/prompts.py): reasoning-gym's own
scorer on its own items, TRL's overlong punishment, transformers' chat template with the
generation prompt, one line for each bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tunewright.data.formats import DataError
from tunewright.data.prompts import prompt_dataset, reasoning_gym_prompts
from tunewright.data.tokenizer import load_tokenizer
from tunewright.training import rewards as R
from tunewright.training.tiny_assets import tiny_asset


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_asset("llama"), max_seq_len=512)


# ---------------------------------------------------------------- reward functions
def test_answer_extraction():
    assert R.extract_answer("<think>2+2</think><answer> 4 </answer>") == "4"
    assert R.extract_answer("<answer>3</answer> then <answer>5</answer>") == "5"  # the last one
    assert R.extract_answer("\n  17\nbecause ...") == "17"  # else the first non-empty line
    assert R.extract_answer("") == ""


def test_reasoning_gym_score_is_reasoning_gyms_own_scorer():
    import reasoning_gym

    items = list(reasoning_gym.create_dataset("basic_arithmetic", size=6, seed=3, max_terms=2, min_terms=2,
                                              min_digits=1, max_digits=1))
    score = reasoning_gym.get_score_answer_fn("basic_arithmetic")
    replies = [f"<answer>{it['answer']}</answer>" if i % 2 == 0 else f"{int(it['answer']) + 1}\nso"
               for i, it in enumerate(items)]
    fields = {"answer": [it["answer"] for it in items], "task": ["basic_arithmetic"] * 6,
              "metadata": [json.dumps(it["metadata"], default=str) for it in items]}
    got = R.reasoning_gym_score()([""] * 6, replies, **fields)
    want = [score(R.extract_answer(r), it) for r, it in zip(replies, items)]
    assert got == want == [1.0, 0.0] * 3


def test_exact_format_and_length_rewards():
    fields = {"output": ["olleh", "42"], "completion_ids": [[1] * 3, [1] * 12]}
    assert R.exact_match("output")([], ["olleh\nmore", "<answer>41</answer>"], **fields) == [1.0, 0.0]
    assert R.format_reward(r"^<answer>\d+</answer>$")([], ["<answer>7</answer>", "7"], **fields) == [1.0, 0.0]
    assert R.length_penalty(free_tokens=5, per_token=0.5)([], ["a", "b"], **fields) == [0.0, -3.5]
    from trl.rewards import get_soft_overlong_punishment

    want = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)(fields["completion_ids"])
    assert R.overlong_penalty(10, 4)([], ["a", "b"], **fields) == pytest.approx(want)
    with pytest.raises(ValueError, match="not a regular expression"):
        R.format_reward("(")


def test_reward_set_weighs_and_leaves_out_missing_rewards():
    def first(prompts, completions, **fields):
        return [1.0, 0.0, None]

    def second(prompts, completions, **fields):
        return [0.5, 2, 1.0]

    rs = R.RewardSet([first, second], weights=[2.0, 0.5])
    per = rs.score(["p"] * 3, ["a", "b", "c"], [[1], [2], [3]], {})
    assert per[:, 0].isnan().tolist() == [False, False, True]
    torch.testing.assert_close(rs.total(per), torch.tensor([2.25, 1.0, 0.5]))
    metrics = R.reward_metrics(rs, per, device="cpu")
    assert metrics["reward"].item() == pytest.approx(torch.tensor([2.25, 1.0, 0.5]).mean().item())
    assert metrics["reward_std"].item() == pytest.approx(torch.tensor([2.25, 1.0, 0.5]).std().item())
    assert metrics["rewards/first/mean"].item() == pytest.approx(0.5)  # over the two rows it scored
    assert metrics["rewards/second/std"].item() == pytest.approx(torch.tensor([0.5, 2, 1.0]).std().item())


def test_bad_reward_functions_are_named_in_one_line():
    def broken(prompts, completions, **fields):
        raise KeyError("answer")

    def short(prompts, completions, **fields):
        return [1.0]

    def text(prompts, completions, **fields):
        return ["1.0", 1.0]

    for fn, match in [(broken, "reward function 'broken' raised KeyError: 'answer'"),
                      (short, "reward function 'short' returned 1 rewards for 2 completions"),
                      (text, "reward function 'text' returned '1.0' for completion 0")]:
        with pytest.raises(ValueError, match=match) as e:
            R.RewardSet([fn]).score(["p", "q"], ["a", "b"], [[1], [2]], {})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="2 values for 1 reward functions"):
        R.RewardSet([short], weights=[1.0, 2.0])


def test_score_rollouts_decodes_without_the_stop_token_and_repeats_fields(tokenizer):
    rows = [{"prompt": "a", "prompt_ids": [1], "answer": "hi"}, {"prompt": "b", "prompt_ids": [2], "answer": "yo"}]
    stop = sorted(tokenizer.stop_ids)[0]
    completions = [tokenizer.encode("hi") + [stop], tokenizer.encode("ho"), tokenizer.encode("yo") + [stop],
                   tokenizer.encode("yo")]
    per = R.score_rollouts(R.RewardSet([R.exact_match()]), rows, completions, tokenizer, num_generations=2)
    assert per[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------- prompts
def test_prompts_are_rendered_with_the_generation_prompt_as_transformers_does(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_asset("llama"))
    rows = [{"prompt": "Add 2 and 3.", "answer": "5"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": "x"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prompt_dataset(tokenizer, source=str(path))
    want = [hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            for messages in ([{"role": "user", "content": "Add 2 and 3."}], rows[1]["prompt"])]
    assert [item["prompt_ids"] for item in data] == want
    assert data[0]["answer"] == "5" and data[0]["prompt"] == "Add 2 and 3."


def test_sft_data_gives_prompts_without_their_reply(tokenizer):
    data = prompt_dataset(tokenizer, source=str(tiny_asset("sft")), split="train[:4]", format="instruct")
    row = data[0]
    ids, _ = tokenizer.tokenize_messages([row["prompt"][0]], add_generation_prompt=True)
    assert row["prompt_ids"] == ids and row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    assert "output" in row  # the reference answer stays for the reward functions


def test_reasoning_gym_prompts_are_seeded_and_carry_what_the_scorer_needs(tokenizer):
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    a = reasoning_gym_prompts(tokenizer, task="basic_arithmetic", size=5, seed=1, task_config=config, num_few_shot=2)
    b = reasoning_gym_prompts(tokenizer, task="basic_arithmetic", size=5, seed=1, task_config=config, num_few_shot=2)
    c = reasoning_gym_prompts(tokenizer, task="basic_arithmetic", size=5, seed=2, task_config=config)
    assert [x["prompt_ids"] for x in a] == [x["prompt_ids"] for x in b]
    assert [x["question"] for x in a] != [x["question"] for x in c]
    item = a[0]
    assert [m["role"] for m in item["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert item["prompt"][-1]["content"] == item["question"]
    reply = f"<answer>{item['answer']}</answer>"
    fields = {k: [item[k]] for k in ("answer", "task", "metadata")}
    assert R.reasoning_gym_score()([""], [reply], **fields) == [1.0]


def test_bad_prompt_data_is_one_line(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x " * 50}) + "\n")
    with pytest.raises(DataError, match=r"row 0: the prompt has \d+ tokens, more than max_prompt_len=20"):
        prompt_dataset(tokenizer, source=str(path), max_prompt_len=20)
    path.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(DataError, match="needs a column 'prompt'; the columns are question"):
        prompt_dataset(tokenizer, source=str(path))
    path.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match="row 0: field 'prompt' must be a string or a list of messages"):
        prompt_dataset(tokenizer, source=str(path))


def test_a_reward_model_scores_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tunewright.models import load_pretrained, save_pretrained

    source = tiny_asset("llama")
    save_pretrained(load_pretrained(source, num_labels=1), tmp_path / "rm", source_dir=source)
    prompts = ["Add 2 and 3.", [{"role": "user", "content": "Reverse abc."}]]
    completions = ["5", "cba"]
    got = R.reward_model(str(tmp_path / "rm"), batch_size=1)(prompts, completions)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    want = []
    for prompt, completion in zip(prompts, completions):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = hf_tok.apply_chat_template([*turns, {"role": "assistant", "content": completion}], return_dict=False)
        with torch.no_grad():
            want.append(theirs(torch.tensor([ids])).logits[0, 0].item())
    assert got == pytest.approx(want, abs=1e-4)
    assert got[0] != pytest.approx(got[1], abs=1e-3)
    with pytest.raises(ValueError, match="is a causal LM, not a reward model"):
        R.reward_model(str(source))
