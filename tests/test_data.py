"""SFT data pipeline: loading, row formats, shifted labels, packing and collation."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
import time

import pytest
import torch

from tunewright.data import DataError, PackedDataset, SFTDataset, collate_padded, load_rows
from tunewright.data import sft_dataset
from tunewright.data.formats import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, make_converter

IGNORE = -100


class ByteTokenizer:
    """Byte-level stand-in for a real tokenizer: id = byte + 3; chat turns are `<role>\\n...`."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259
    stop_ids = frozenset({2})

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [self.bos_id] * add_bos + [b + 3 for b in text.encode()] + [self.eos_id] * add_eos

    def decode(self, ids, *, skip_special=False):
        return bytes(i - 3 for i in ids if i >= 3).decode()

    def tokenize_messages(self, messages, *, add_generation_prompt=False):
        ids, mask = [self.bos_id], [False]
        for message in messages:
            header = self.encode(f"<{message['role']}>\n")
            body = self.encode(message["content"], add_eos=True)
            trained = message["role"] == "assistant"
            ids += header + body
            mask += [False] * len(header) + [trained] * len(body)
        return ids, mask


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the arrow caches `datasets` writes for local files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


TOK = ByteTokenizer()
ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "2 and 2", "output": "4"},
    {"instruction": "Echo", "input": "", "output": "echo"},
    {"instruction": "Spell cat", "input": "", "output": "c-a-t"},
]


def targets(item):
    """The text of the trained targets of an item."""
    return TOK.decode([t for t in item["labels"] if t != IGNORE])


def write_rows(path, rows):
    """Write `rows` in the format the file extension names."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --- sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_load_rows_reads_local_files_by_extension(tmp_path, suffix):
    path = write_rows(tmp_path / f"alpaca{suffix}", ALPACA)
    rows = load_rows(path)
    # csv reads an empty cell as None; the instruct format treats that as no input
    convert = make_converter("instruct")
    assert [convert(row) for row in rows] == [convert(row) for row in ALPACA]


def test_load_rows_builder_name_with_data_files(tmp_path):
    path = tmp_path / "rows.data"  # an extension only the builder name makes readable
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    assert list(load_rows("json", data_files=str(path))) == ALPACA


def test_split_slices_partition_a_local_file(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(8)]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    head = list(load_rows(path, split="train[:75%]"))
    tail = list(load_rows(path, split="train[75%:]"))
    assert (len(head), len(tail)) == (6, 2)
    assert head + tail == rows


def test_missing_file_is_a_value_error_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="not found: .*nope.jsonl"):
        load_rows(missing)
    with pytest.raises(ValueError, match="nope.jsonl"):
        load_rows("json", data_files=[missing])


def test_unreachable_hub_dataset_fails_fast_in_one_line(monkeypatch):
    import datasets
    import huggingface_hub

    # The flags are read at import time, so set the module constants as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not load dataset 'nobody-tw/made-up-sft-set'") as e:
        load_rows("nobody-tw/made-up-sft-set")
    assert time.monotonic() - start < 10
    assert "\n" not in str(e.value)


def test_importing_the_package_does_not_import_torch_or_datasets():
    code = (
        "import sys, tunewright.data as d; "
        "assert not {'torch', 'datasets'} & set(sys.modules), sorted(sys.modules); "
        "d.load_rows; assert 'datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- formats ------------------------------------------------------------------------------


def test_instruct_column_map_and_alpaca_prompt():
    rows = [
        {"prompt": "Add", "context": "2 and 2", "answer": "4"},
        {"prompt": "Hi", "answer": "hi"},
    ]
    columns = {"instruction": "prompt", "input": "context", "output": "answer"}
    convert = make_converter("instruct", column_map=columns)
    with_input, without_input = convert(rows[0]), convert(rows[1])
    assert with_input == [
        {"role": "user", "content": PROMPT_WITH_INPUT.format(instruction="Add", input="2 and 2")},
        {"role": "assistant", "content": "4"},
    ]
    assert without_input[0]["content"] == PROMPT_NO_INPUT.format(instruction="Hi")
    assert without_input[0]["content"].endswith("### Instruction:\nHi\n\n### Response:\n")


def test_chat_messages_and_sharegpt_rows_tokenize_identically():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]
    remapped = [{"speaker": m["role"], "text": m["content"]} for m in messages]
    a = SFTDataset([{"messages": messages}], TOK, format="chat")[0]
    b = SFTDataset([{"conversations": sharegpt}], TOK, format="chat")[0]
    c = SFTDataset(
        [{"dialog": remapped}],
        TOK,
        format="chat",
        column_map={"messages": "dialog", "role": "speaker", "content": "text"},
    )[0]
    assert a == b == c
    assert targets(a) == "hiciao"  # both assistant turns (with their eos), nothing else


def test_system_prompt_replaces_the_rows_own():
    row = {"messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "q"}]}
    messages = make_converter("chat", system_prompt="new")(row)
    assert [(m["role"], m["content"]) for m in messages] == [("system", "new"), ("user", "q")]
    instruct = make_converter("instruct", system_prompt="new")(ALPACA[0])
    assert [m["role"] for m in instruct] == ["system", "user", "assistant"]


def test_text_format_trains_on_every_token_after_bos():
    item = SFTDataset([{"body": "hello"}], TOK, format="text", column_map={"text": "body"})[0]
    assert item["tokens"] == TOK.encode("hello", add_bos=True, add_eos=True)
    assert item["labels"] == item["tokens"][1:] + [IGNORE]


@pytest.mark.parametrize(
    ("fmt", "bad_row", "problem"),
    [
        ("instruct", {"instruction": "x", "input": ""}, "missing field 'output'"),
        ("instruct", {"instruction": 3, "output": "y"}, "field 'instruction' must be a string"),
        ("text", {"text": None}, "missing field 'text'"),
        (
            "chat",
            {"messages": [{"role": "bot", "content": "x"}]},
            "field 'messages[0].role' has unknown role 'bot'",
        ),
        ("chat", {"messages": [{"role": "user"}]}, "missing field 'messages[0].content'"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, fmt, bad_row, problem):
    good = {
        "instruct": {"instruction": "x", "input": "", "output": "y"},
        "text": {"text": "x"},
        "chat": {"messages": [{"role": "user", "content": "x"}]},
    }[fmt]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, bad_row]))
    with pytest.raises(DataError) as e:
        sft_dataset(TOK, source=str(path), format=fmt)
    message = str(e.value)
    assert message.startswith(f"{path} row 2: {problem}")
    assert "\n" not in message


def test_unknown_format_and_column_map_key_are_rejected():
    with pytest.raises(ValueError, match="unknown dataset format 'alpaca'"):
        SFTDataset(ALPACA, TOK, format="alpaca")
    with pytest.raises(ValueError, match="'outptu'"):
        SFTDataset(ALPACA, TOK, column_map={"outptu": "answer"})
    # a config typo is reported before any file is read
    with pytest.raises(ValueError, match="unknown dataset format"):
        sft_dataset(TOK, source="not/there.json", format="alpaca")


# --- labels -------------------------------------------------------------------------------


def test_labels_are_shifted_and_train_only_the_response():
    item = SFTDataset(ALPACA[1:2], TOK)[0]
    tokens, labels = item["tokens"], item["labels"]
    assert len(tokens) == len(labels) and labels[-1] == IGNORE
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert all(labels[i] == tokens[i + 1] for i in trained)
    # The targets are the response and its eos, predicted from the position before each.
    assert targets(item) == "4" and labels[trained[-1]] == TOK.eos_id
    assert TOK.decode(tokens[: trained[0] + 1]).endswith("### Response:\n<assistant>\n")


def test_train_on_input_trains_every_next_token():
    item = SFTDataset(ALPACA[1:2], TOK, train_on_input=True)[0]
    assert item["labels"] == item["tokens"][1:] + [IGNORE]


def test_truncation_cuts_tokens_and_ends_with_ignored_label():
    full = SFTDataset(ALPACA[1:2], TOK, train_on_input=True)[0]
    cut = SFTDataset(ALPACA[1:2], TOK, train_on_input=True, max_seq_len=10)[0]
    assert cut["tokens"] == full["tokens"][:10]
    assert cut["labels"] == full["labels"][:9] + [IGNORE]


# --- packing ------------------------------------------------------------------------------


def varied_text_rows(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 16, (n,), generator=generator).tolist()
    return [{"text": chr(ord("a") + i % 26) * length} for i, length in enumerate(lengths)]


def test_packing_keeps_documents_apart_and_all_their_targets():
    max_seq_len = 32
    rows = varied_text_rows() + [{"text": "z" * 40}]  # one longer than max_seq_len
    packed = PackedDataset(SFTDataset(rows, TOK, format="text"), max_seq_len=max_seq_len, pad_id=0)
    reference = SFTDataset(rows, TOK, format="text", max_seq_len=max_seq_len)

    documents = []
    for item in packed:
        assert {len(v) for v in item.values()} == {max_seq_len}
        doc_ids, input_pos, labels = item["doc_ids"], item["input_pos"], item["labels"]
        for i in range(max_seq_len):
            new_doc = i == 0 or doc_ids[i] != doc_ids[i - 1]
            assert input_pos[i] == (0 if new_doc else input_pos[i - 1] + 1)
            if labels[i] != IGNORE:  # a target is the next token of the same document
                assert doc_ids[i + 1] == doc_ids[i] != -1 and labels[i] == item["tokens"][i + 1]
        for doc in sorted(set(doc_ids) - {-1}):
            span = [i for i, d in enumerate(doc_ids) if d == doc]
            documents.append({k: [item[k][i] for i in span] for k in ("tokens", "labels")})
        padding = [i for i, d in enumerate(doc_ids) if d == -1]
        assert all(item["tokens"][i] == 0 and labels[i] == IGNORE for i in padding)
    # Greedy in order, nothing split or lost: the documents are the truncated samples.
    assert documents == list(reference)
    assert len(packed) < len(rows) / 2


def test_sft_dataset_factory_packs_a_file(tmp_path):
    path = write_rows(tmp_path / "alpaca.json", ALPACA * 3)
    unpacked = sft_dataset(TOK, source=path, max_seq_len=1024)
    packed = sft_dataset(TOK, source=path, max_seq_len=1024, packed=True)
    assert isinstance(packed, PackedDataset) and len(packed) < len(unpacked)
    count = lambda ds: sum(sum(t != IGNORE for t in item["labels"]) for item in ds)  # noqa: E731
    assert count(packed) == count(unpacked) > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        sft_dataset(TOK, source=path, packed=True)


# --- collation ----------------------------------------------------------------------------


def test_collate_right_pads_and_counts():
    batch = [
        {"tokens": [5, 6, 7], "labels": [6, 7, IGNORE]},
        {"tokens": [8, 9, 10, 11, 12], "labels": [IGNORE, 10, 11, 12, IGNORE]},
    ]
    out = collate_padded(batch, pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[6, 7, IGNORE, IGNORE, IGNORE], [IGNORE, 10, 11, 12, IGNORE]]
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    assert (out["num_tokens"], out["num_targets"]) == (8, 5)
    assert "doc_ids" not in out
    # pad_id may be a real token (often eos): padding is counted by position, not by value.
    assert collate_padded(batch, pad_id=12, pad_to_multiple_of=4)["tokens"].shape == (2, 8)
    assert collate_padded(batch, pad_id=12)["num_tokens"] == 8


def test_collate_packed_rows_through_a_dataloader():
    samples = SFTDataset(varied_text_rows(), TOK, format="text")
    packed = PackedDataset(samples, max_seq_len=32, pad_id=0)
    loader = torch.utils.data.DataLoader(
        packed, batch_size=4, collate_fn=functools.partial(collate_padded, pad_id=0)
    )
    batch = next(iter(loader))
    assert {batch[k].shape for k in ("tokens", "labels", "input_pos", "doc_ids")} == {(4, 32)}
    assert batch["num_tokens"] == int((batch["doc_ids"] != -1).sum()) < 4 * 32
    expected_targets = sum(sum(t != IGNORE for t in packed[i]["labels"]) for i in range(4))
    assert batch["num_targets"] == expected_targets
