"""Data that cannot train is found before training, in one line naming the file and the place:
rows without targets, empty and non-UTF-8 files, JSON that does not parse, missing columns,
chat templates that do not parse or that raise. Also: the README's example rows are valid, and
`datasets`' progress noise stays off the console."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from test_data import ALPACA, TOK, write_rows
from tunewright.data import DataError, SFTDataset, load_rows, sft_dataset
from tunewright.data import files
from tunewright.data.formats import check_columns, instruct_messages
from tunewright.data.tokenizer import load_tokenizer
from tunewright.data.tokenizer.chat import ChatFormat, ChatTemplateError
from tunewright.training.tiny_assets import tiny_asset

IGNORE = -100
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


# --- rows with nothing to learn from --------------------------------------------------------


def first_target(row: dict, max_seq_len: int) -> int | None:
    """Reference: the first position whose label is trained, from the tokenizer directly."""
    _, trained = TOK.tokenize_messages(instruct_messages(row))
    trained = trained[:max_seq_len]
    return next((i - 1 for i in range(1, len(trained)) if trained[i]), None)


def test_rows_that_lose_their_reply_are_dropped_and_counted():
    rng = random.Random(0)
    rows = [{"instruction": "x" * rng.randint(1, 60), "output": "y" * rng.randint(1, 5)} for _ in range(60)]
    max_seq_len = 200
    kept = [row for row in rows if first_target(row, max_seq_len) is not None]
    assert 0 < len(kept) < len(rows)  # the draw has both kinds

    dataset = SFTDataset(rows, TOK, max_seq_len=max_seq_len, source="rows.jsonl")
    alone = SFTDataset(kept, TOK, max_seq_len=max_seq_len)
    assert [dataset[i] for i in range(len(dataset))] == [alone[i] for i in range(len(alone))]
    dropped = len(rows) - len(kept)
    assert (dataset.num_rows_read, dataset.num_dropped, dataset.num_cut) == (len(rows), dropped, dropped)
    assert dataset.dropped_warning() == (f"warning: rows.jsonl: dropped {dropped} of {len(rows)} rows that have "
                                         f"no target token ({dropped} cut off at max_seq_len=200 before their reply)")
    assert alone.dropped_warning() is None
    assert dataset.max_token_id == max(max(dataset[i]["tokens"]) for i in range(len(dataset)))


def test_no_target_anywhere_is_an_error_naming_the_source(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", ALPACA)
    with pytest.raises(DataError) as e:
        sft_dataset(TOK, source=path, max_seq_len=8)
    assert str(e.value) == (f"{path}: no row has a target token, nothing to train on (4 cut off at "
                            f"max_seq_len=8 before their reply); raise max_seq_len or shorten the prompts")


def test_tokenizer_cut_counts_as_truncation():
    # The tokenizer's own max_seq_len cuts chat turns before the dataset sees them.
    tokenizer = load_tokenizer(tiny_asset("llama"), max_seq_len=12)
    with pytest.raises(DataError, match=r"\(4 cut off at max_seq_len=12 before their reply\)"):
        SFTDataset(ALPACA, tokenizer)


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 24])
def test_non_utf8_is_found_on_its_line_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(files, "_CHUNK", chunk)
    rng = random.Random(chunk)
    lines = [("é" * rng.randint(0, 3) + "ab\u20ac") * rng.randint(1, 4) for _ in range(30)]
    data = "\n".join(lines).encode()
    path = tmp_path / "rows.txt"
    path.write_bytes(data)
    files.check_text_file(path)  # multi-byte characters split across chunks are fine
    text = "\n".join(lines)
    at = len(text[: rng.randrange(len(text))].encode())  # between two characters
    path.write_bytes(data[:at] + b"\xff" + data[at:])
    line = data[:at].count(b"\n") + 1
    with pytest.raises(ValueError) as e:
        files.check_text_file(path)
    assert str(e.value).startswith(f"{path}: line {line} is not UTF-8 text (byte 0xff at offset {at})")


def test_empty_and_cut_utf8_files(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    monkeypatch.setattr(files, "_CHUNK", 1)  # a character's first bytes wait in the decoder
    path.write_bytes(b"ab\n" + "\u20ac".encode()[:2] + b"\ncd")
    with pytest.raises(ValueError, match=r"x.jsonl: line 2 is not UTF-8 text \(byte 0xe2 at offset 3\)"):
        files.check_text_file(path)
    for content in (b"", b" \n\n\t"):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"x.jsonl: the file is empty$"):
            files.check_text_file(path)
    path.write_bytes("{}\ncaf\u00e9".encode()[:-1])
    with pytest.raises(ValueError, match="ends in the middle of a UTF-8 character"):
        files.check_text_file(path)


def test_the_first_bad_json_line_is_named(tmp_path):
    rng = random.Random(1)
    rows = [json.dumps({"text": "r" * rng.randint(0, 9)}) for _ in range(40)]
    for bad, suffix in ((17, ".jsonl"), (0, ".jsonl"), (39, ".json")):
        lines = rows[:bad] + ['{"text": "unterminated'] + rows[bad + 1:]
        path = tmp_path / f"rows{suffix}"
        path.write_text("\n".join(lines) + "\n")
        assert files.locate_json_error(path).startswith(f"line {bad + 1} column ")
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: line {bad + 1} column"):
            load_rows(str(path))
    path.write_text("\n".join(rows))
    assert files.locate_json_error(path) is None


def test_a_broken_json_document_names_the_parser_position(tmp_path):
    text = json.dumps(ALPACA, indent=1).replace('"echo"', '"echo" "x"')
    path = tmp_path / "alpaca.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    where = f"line {reference.value.lineno} column {reference.value.colno}: {reference.value.msg}"
    assert files.locate_json_error(path) == where
    with pytest.raises(ValueError, match=f"alpaca.json: {where}"):
        load_rows(str(path))


def test_read_json_names_file_line_and_shape(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON at line 4 column 1: Expecting value"):
        files.read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, found a JSON list"):
        files.read_json(path)


def test_tsv_files_split_on_tabs(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("instruction\toutput\nhi, there\tyo\n")
    assert list(load_rows(str(path))) == [{"instruction": "hi, there", "output": "yo"}]


def test_loading_prints_no_progress_noise(tmp_path, capfd):
    import datasets

    before = datasets.are_progress_bars_disabled()
    load_rows(write_rows(tmp_path / "rows.jsonl", ALPACA))
    captured = capfd.readouterr()
    assert "Generating" not in captured.err + captured.out
    assert datasets.are_progress_bars_disabled() == before  # restored for whoever wants them


# --- columns -------------------------------------------------------------------------------


def test_a_missing_column_lists_the_columns_and_column_map(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        sft_dataset(TOK, source=path)
    assert str(e.value) == (f"{path}: format 'instruct' needs a column 'instruction'; the columns are "
                            f"question, answer (map yours with dataset.column_map, e.g. column_map: "
                            f"{{instruction: <your column>}})")
    # mapped, the same file trains
    assert len(sft_dataset(TOK, source=path, column_map={"instruction": "question", "output": "answer"})) == 1
    check_columns("chat", ["conversations"], source="x")
    with pytest.raises(DataError, match="needs a column 'dialog' or 'conversations'"):
        check_columns("chat", ["text"], column_map={"messages": "dialog"}, source="x")


# --- chat templates ------------------------------------------------------------------------


def test_a_template_that_does_not_parse_names_its_origin_and_line():
    with pytest.raises(ChatTemplateError) as e:
        ChatFormat("{% for m in messages %}\n{{ m.content }\n{% endfor %}", origin="my/chat_template.jinja")
    assert str(e.value).startswith("chat template (my/chat_template.jinja) does not parse: line 2: ")


def test_a_template_that_raises_names_its_origin_and_the_row(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text((tiny_asset("llama") / "tokenizer.json").read_text())
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ raise_exception('only one turn, please') if messages | length > 2 }}")
    tokenizer = load_tokenizer(model)
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * n} for n in (1, 2)]
    with pytest.raises(DataError) as e:
        SFTDataset(rows, tokenizer, format="chat", source="chats.jsonl")
    assert str(e.value) == (f"chats.jsonl row 1: chat template ({model / 'chat_template.jinja'}) failed on "
                            f"this conversation: only one turn, please")


def test_a_default_template_says_which_name_and_why():
    tokenizer = load_tokenizer(tiny_asset("llama"), chat_template="gemma2")
    with pytest.raises(ChatTemplateError, match=r"^chat template \(named template 'gemma2'\) failed on this "
                                                r"conversation: System role not supported$"):
        tokenizer.tokenize_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    fmt = ChatFormat("{{ messages[0].content + 1 }}")
    with pytest.raises(ChatTemplateError, match=r"^chat template \(the given chat template\) failed"):
        fmt.render([{"role": "user", "content": "u"}])


# --- the README documents formats that work -------------------------------------------------


def readme_example_rows() -> list[tuple[str, dict]]:
    """(format, row) for each one-line JSON example in the README's "Datasets" section."""
    section = README.read_text().split("## Datasets", 1)[1].split("\n## ", 1)[0]
    formats = section.split("**Formats**", 1)[1].split("**`column_map`**", 1)[0]
    found = []
    for item in formats.split("\n- ")[1:]:
        fmt = re.match(r"`(\w+)`", item).group(1)
        found += [(fmt, json.loads(example)) for example in re.findall(r"`(\{.*?\})`(?=[,.]|$)", item, re.M)]
    return found


def test_readme_example_rows_train_their_replies():
    examples = readme_example_rows()
    assert sorted({fmt for fmt, _ in examples}) == ["chat", "instruct", "text"] and len(examples) == 4
    replies = {"instruct": "5", "chat": "Hello!", "text": "Once upon a time ..."}
    for fmt, row in examples:
        item = SFTDataset([row], TOK, format=fmt)[0]
        targets = TOK.decode([t for t in item["labels"] if t != IGNORE])
        assert targets == replies[fmt], (fmt, row)


# --- the run says what it dropped ------------------------------------------------------------


def test_a_run_counts_the_rows_it_drops_in_one_line(tmp_path):
    from bad_inputs.harness import TINY, run_tune

    tokenizer = load_tokenizer(tiny_asset("llama"))
    rows = list(load_rows(str(tiny_asset("sft")), split="train[:90%]"))
    limit = 240
    firsts = [first_trained(tokenizer, row) for row in rows]
    dropped = sum(first >= limit for first in firsts)
    assert 0 < dropped < len(rows)

    result = run_tune(["run", "sft", "--config", "llama/tiny_full", f"output_dir={tmp_path / 'out'}", *TINY,
                       f"tokenizer.max_seq_len={limit}", "~val_dataset"], cwd=tmp_path)
    assert result.code == 0 and result.err == "", result.err
    warnings = [line for line in result.out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tiny_asset('sft')} (split 'train[:90%]'): dropped {dropped} of {len(rows)} "
                        f"rows that have no target token ({dropped} cut off at max_seq_len={limit} before their reply)"]


def first_trained(tokenizer, row: dict) -> int:
    """Reference: the first position after the first whose token is trained, untruncated."""
    _, trained = tokenizer.tokenize_messages(instruct_messages(row))
    return next(i for i in range(1, len(trained)) if trained[i])
