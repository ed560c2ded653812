"""Preference data (data/preference.py): every input form gives the token ids transformers'
`apply_chat_template` gives for prompt + answer, with targets on the answer only; truncation
keeps the prompt's end; the batches put chosen and rejected rows in one forward; bad rows fail in
one line naming the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunewright.data.formats import DataError
from tunewright.data.preference import (PreferenceDataset, UnpairedPreferenceDataset, collate_pairs,
                                        collate_unpaired, preference_dataset, unpaired_preference_dataset)
from tunewright.data.tokenizer import load_tokenizer
from tunewright.data.tokenizer.base import IGNORE_INDEX
from tunewright.training.tiny_assets import tiny_asset

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
CHOSEN, REJECTED = "5", "six"
CONVERSATIONAL = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
                  "rejected": [{"role": "assistant", "content": REJECTED}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_asset("llama"))


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_asset("llama"))


def _ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def targets(tokens: list[int], labels: list[int]) -> list[int]:
    """The tokens trained on: labels are shifted, label i is token i + 1."""
    assert labels[:-1] == [t if l != IGNORE_INDEX else IGNORE_INDEX for t, l in zip(tokens[1:], labels[:-1])]
    return [t for t in labels if t != IGNORE_INDEX]


def test_conversational_pairs_equal_transformers_chat_template(tokenizer, hf) -> None:
    item = PreferenceDataset([CONVERSATIONAL], tokenizer)[0]
    prompt_ids = _ids(hf, PROMPT, add_generation_prompt=True)
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        full = _ids(hf, PROMPT + [{"role": "assistant", "content": answer}])
        assert item[f"{side}_tokens"] == full
        assert full[: len(prompt_ids)] == prompt_ids
        # targets: the answer and its end-of-turn token, nothing of the prompt
        assert hf.decode(targets(full, item[f"{side}_labels"])) == answer + "<|im_end|>"
        assert all(label == IGNORE_INDEX for label in item[f"{side}_labels"][: len(prompt_ids) - 1])


def test_every_form_and_column_map_give_the_same_pair(tokenizer) -> None:
    want = PreferenceDataset([CONVERSATIONAL], tokenizer)[0]
    torchtune = {"chosen": PROMPT + CONVERSATIONAL["chosen"], "rejected": PROMPT + CONVERSATIONAL["rejected"]}
    assert PreferenceDataset([torchtune], tokenizer)[0] == want
    renamed = {"question": [{"speaker": m["role"], "text": m["content"]} for m in PROMPT],
               "good": [{"speaker": "assistant", "text": CHOSEN}], "bad": [{"speaker": "assistant", "text": REJECTED}]}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "role": "speaker", "content": "text"}
    assert PreferenceDataset([renamed], tokenizer, column_map=columns)[0] == want
    standard = {"prompt": "Add 2 and 3.", "chosen": CHOSEN, "rejected": REJECTED}
    assert PreferenceDataset([standard], tokenizer, system_prompt="Be brief.")[0] == want


def test_earlier_assistant_turns_are_context_not_targets(tokenizer, hf) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
               {"role": "user", "content": "Add 2 and 3."}]
    row = {"prompt": history, "chosen": CHOSEN, "rejected": REJECTED}
    item = PreferenceDataset([row], tokenizer)[0]
    assert item["chosen_tokens"] == _ids(hf, history + [{"role": "assistant", "content": CHOSEN}])
    assert hf.decode(targets(item["chosen_tokens"], item["chosen_labels"])) == CHOSEN + "<|im_end|>"


def test_plain_text_without_chat_template(tokenizer) -> None:
    row = {"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " six"}
    item = PreferenceDataset([row], tokenizer, chat_template=False)[0]
    prompt = tokenizer.encode("Add 2 and 3.")
    assert item["chosen_tokens"][: len(prompt)] == prompt
    assert tokenizer.decode(targets(item["chosen_tokens"], item["chosen_labels"])) == " 5<|im_end|>"


def test_truncation_keeps_the_prompts_end_and_drops_pairs_without_room(tokenizer) -> None:
    long_prompt = "word " * 40
    rows = [{"prompt": long_prompt, "chosen": "yes", "rejected": "no, not at all"},
            {"prompt": "short", "chosen": "x" * 80, "rejected": "y"}]
    whole = PreferenceDataset(rows[:1], tokenizer)[0]
    dataset = PreferenceDataset(rows, tokenizer, max_seq_len=40, source="pairs.jsonl")
    assert len(dataset) == 1
    item = dataset[0]
    for side in ("chosen", "rejected"):
        tokens = item[f"{side}_tokens"]
        assert len(tokens) <= 40 and tokens == whole[f"{side}_tokens"][-len(tokens):]  # the end, answer whole
        assert targets(tokens, item[f"{side}_labels"]) == targets(whole[f"{side}_tokens"], whole[f"{side}_labels"])
    # both answers follow the same prompt tokens
    shared = len(item["rejected_tokens"]) - len(targets(item["rejected_tokens"], item["rejected_labels"])) - 1
    assert item["chosen_tokens"][:shared] == item["rejected_tokens"][:shared]
    warning = dataset.dropped_warning()
    assert warning == ("warning: pairs.jsonl: dropped 1 of 2 pairs (1 whose answer does not fit "
                       "max_seq_len=40)")
    # a tokenizer's own max_seq_len would keep the conversation's START; here it keeps the answer
    capped = load_tokenizer(tiny_asset("llama"), max_seq_len=40)
    assert PreferenceDataset(rows, capped)[0] == item
    assert capped.max_seq_len == 40


def _write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     "pairs.jsonl row 1: missing field 'rejected'"),
    ([{"prompt": "a", "chosen": "b", "rejected": "b"}],
     "pairs.jsonl row 0: chosen and rejected are identical, so there is nothing to prefer"),
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}],
     "pairs.jsonl row 0: fields 'chosen' and 'rejected' do not share their prompt"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c" * 90}], "no pairs left to train on (1 whose answer does not fit"),
])
def test_bad_pairs_fail_in_one_line(tmp_path: Path, tokenizer, rows: list[dict], message: str) -> None:
    with pytest.raises(DataError) as caught:
        preference_dataset(tokenizer, source=_write(tmp_path, rows), max_seq_len=64)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_kto_needs_both_classes(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": True}]
    with pytest.raises(DataError, match=r"pairs.jsonl: all 2 examples are desirable \(label true\); KTO needs both"):
        unpaired_preference_dataset(tokenizer, source=_write(tmp_path, rows))
    with pytest.raises(DataError, match="row 0: field 'label' must be true"):
        UnpairedPreferenceDataset([{"prompt": "a", "completion": "b", "label": "yes"}], tokenizer)


def test_collate_pairs_is_collate_padded_of_chosen_then_rejected(tokenizer) -> None:
    from tunewright.data.collate import collate_padded

    rows = [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": "no" * (i + 1)} for i in range(3)]
    dataset = PreferenceDataset(rows, tokenizer)
    items = [dataset[i] for i in range(3)]
    batch = collate_pairs(items, pad_id=tokenizer.pad_id)
    plain = collate_padded([{"tokens": it[f"{s}_tokens"], "labels": it[f"{s}_labels"]}
                            for s in ("chosen", "rejected") for it in items], pad_id=tokenizer.pad_id)
    assert batch.pop("num_pairs") == 3
    assert batch.keys() == plain.keys()
    assert batch["tokens"][1, : len(items[1]["chosen_tokens"])].tolist() == items[1]["chosen_tokens"]
    assert batch["tokens"][3 + 1, : len(items[1]["rejected_tokens"])].tolist() == items[1]["rejected_tokens"]
    # padding-free: the rows laid end to end on the host, as training batches of plain rows are
    from tunewright.data.collate import collate_flat

    flat = collate_pairs(items, pad_id=tokenizer.pad_id, padding_free=True)
    want = collate_flat([{"tokens": it[f"{s}_tokens"], "labels": it[f"{s}_labels"]}
                         for s in ("chosen", "rejected") for it in items])
    assert flat.pop("num_pairs") == 3 and flat["num_rows"] == 6
    assert flat.keys() == want.keys() and all(
        torch.equal(v, want[k]) if torch.is_tensor(v) else v == want[k] for k, v in flat.items())


def test_kto_batches_rotate_completions_for_the_kl_rows(tokenizer) -> None:
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(3)]
    dataset = UnpairedPreferenceDataset(rows, tokenizer)
    batch = collate_unpaired([dataset[i] for i in range(3)], pad_id=tokenizer.pad_id)
    assert batch["label"].tolist() == [True, False, True] and batch["num_pairs"] == 3
    kl = batch["kl"]
    for i, j in ((0, 2), (1, 0), (2, 1)):  # (x_i, y_{i-1})
        want = PreferenceDataset([{"prompt": f"Question {i}?", "chosen": f"Answer {j}.", "rejected": "-"}],
                                 tokenizer)[0]
        n = kl["seq_lens"][i]
        assert kl["tokens"][i, :n].tolist() == want["chosen_tokens"]
        assert kl["labels"][i, :n].tolist() == want["chosen_labels"]


def test_training_batches_use_the_datasets_collate(tokenizer) -> None:
    from tunewright.training.data_setup import make_batches

    rows = [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": "no"} for i in range(4)]
    batches = make_batches(PreferenceDataset(rows, tokenizer), pad_id=tokenizer.pad_id, batch_size=2, shuffle=False)
    batch = next(iter(batches))
    assert batch["num_pairs"] == 2 and batch["tokens"].shape[0] == 4


def test_a_margin_column_reaches_the_batch_and_the_reward_models_loss(tokenizer) -> None:
    """TRL's optional `margin` (reward modelling): kept per pair, a [B] tensor on the batch,
    and with a margin of d the Bradley-Terry loss at r_c - r_r = d is ln 2."""
    import math

    from tunewright.recipes.reward_model import bradley_terry

    rows = [{**CONVERSATIONAL, "score_gap": 1.5}, {**CONVERSATIONAL, "score_gap": -0.5}]
    data = PreferenceDataset(rows, tokenizer, column_map={"margin": "score_gap"})
    batch = collate_pairs([data[0], data[1]], pad_id=tokenizer.pad_id, padding_free=True)
    assert batch["margin"].tolist() == [1.5, -0.5] and batch["margin"].dtype == torch.float32
    loss = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.5]), margin=batch["margin"])
    assert torch.allclose(loss, torch.full((2,), math.log(2.0)))
    assert "margin" not in collate_pairs([PreferenceDataset([CONVERSATIONAL], tokenizer)[0]], pad_id=0)
    with pytest.raises(DataError, match=r"row 0: column 'margin' holds 'big'; a margin must be a number"):
        PreferenceDataset([{**CONVERSATIONAL, "margin": "big"}], tokenizer)
