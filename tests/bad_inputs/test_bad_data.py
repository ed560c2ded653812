"""Bad data, tokenizer, template and model files: each one line naming the file (and the line,
row, key or tensor), exit 2, before any training step, and nothing written where the result goes.

Every case runs `tune` on the tiny Llama config with one thing broken: a data file, a column, a
tokenizer file, a chat template, config.json, the safetensors weights, or a LoRA adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from harness import TINY, Case, check
from tunewright.training.tiny_assets import tiny_asset

OUT = "out/final"  # what a finished full fine-tune writes: never there after a failed run


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """The arrow caches `datasets` writes for local files go to the case's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


# ------------------------------------------------------------------ set-up helpers
def sft(tmp: Path, *overrides: str) -> list[str]:
    return ["run", "sft", "--config", "llama/tiny_full", f"output_dir={tmp / 'out'}", *TINY, *overrides]


def data_file(name: str, content: str | bytes, fmt: str = "instruct", *overrides: str) -> Callable[[Path], list[str]]:
    """A run whose training data is `content` written to `name` (no validation set)."""

    def argv(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return sft(tmp, f"dataset.source={path}", "dataset.split=train", f"dataset.format={fmt}",
                   "~val_dataset", *overrides)

    return argv


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


ROW = {"instruction": "Say hi.", "output": "hi"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def model_copy(edit: Callable[[Path], None], key: str = "model.path") -> Callable[[Path], list[str]]:
    """A run on a copy of the tiny model directory after `edit`; `key` says which path reads it
    (`model.path`: model and tokenizer, `tokenizer.path`: the tokenizer only)."""

    def argv(tmp: Path) -> list[str]:
        copy = tmp / "m"
        shutil.copytree(tiny_asset("llama"), copy)
        edit(copy)
        return sft(tmp, f"{key}={copy}")

    return argv


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        data.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del data[key]
        (d / name).write_text(json.dumps(data))

    return edit


def truncate(name: str, size: int) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:size])


def edit_tensors(change: Callable[[dict], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tensors = load_file(str(d / name))
        change(tensors)
        save_file(tensors, str(d / name), metadata={"format": "pt"})

    return edit


def poison(tensor_name: str, value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[tensor_name][0, -1] = value

    return change


def smaller_vocab(tensors: dict) -> None:
    # A consistent model of 200 tokens: the tiny tokenizer's special tokens (256-258) do not fit.
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:200].clone()


def template_config(template: str) -> Callable[[Path], list[str]]:
    """A config file (not an override) whose tokenizer names Jinja source as its chat template."""

    def argv(tmp: Path) -> list[str]:
        import yaml

        config = yaml.safe_load((Path(__file__).parents[2] / "configs/llama/tiny_full.yaml").read_text())
        config["tokenizer"]["chat_template"] = template
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["run", "sft", "--config", str(path), f"output_dir={tmp / 'out'}", *TINY]

    return argv


# A LoRA adapter for the tiny Llama written by hand in PEFT's layout (q_proj of both layers,
# rank 4), so that these cases do not depend on the code that saves adapters.
def adapter(edit: Callable[[Path], None] = lambda d: None) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        import torch

        directory = tmp / "adapter"
        directory.mkdir()
        prefix = "base_model.model.model.layers.{}.self_attn.q_proj"
        tensors = {}
        for layer in range(2):
            tensors[f"{prefix.format(layer)}.lora_A.weight"] = torch.full((4, 128), 0.01)
            tensors[f"{prefix.format(layer)}.lora_B.weight"] = torch.full((128, 4), 0.01)
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        edit(directory)
        return ["merge-lora", str(tiny_asset("llama")), str(directory), "--output-dir", str(tmp / "merged")]

    return argv


LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

# ------------------------------------------------------------------ the table
CASES = [
    # --- data files: the line names the file and the line
    Case("data-empty-jsonl", data_file("e.jsonl", ""), ["{tmp}/e.jsonl", "the file is empty"], absent=[OUT]),
    Case("data-blank-json", data_file("e.json", "\n  \n"), ["{tmp}/e.json", "the file is empty"], absent=[OUT]),
    Case("data-not-utf8", data_file("b.jsonl", jsonl(ROW).encode() + b'{"instruction": "\xff", "output": "x"}\n'),
         ["{tmp}/b.jsonl", "line 2 is not UTF-8"], absent=[OUT]),
    Case("data-latin1-csv", data_file("b.csv", "instruction,output\ncaf\xe9,x\n".encode("latin-1")),
         ["{tmp}/b.csv", "line 2 is not UTF-8"], absent=[OUT]),
    Case("data-bad-json-line", data_file("b.jsonl", jsonl(ROW) + '{"instruction": "x", "output": \n' + jsonl(ROW)),
         ["{tmp}/b.jsonl", "line 2 column", "Expecting value"], absent=[OUT]),
    Case("data-broken-json-list", data_file("b.json", '[\n {"instruction": "x", "output": "y"},\n {"instruction": }\n]\n'),
         ["{tmp}/b.json", "line 3 column"], absent=[OUT]),
    Case("data-jsonl-line-not-object", data_file("b.jsonl", jsonl(ROW) + '["x", "y"]\n'),
         ["{tmp}/b.jsonl", "line 2", "expected a JSON object"], absent=[OUT]),
    Case("data-csv-open-quote", data_file("b.csv", 'instruction,output\n"x,y\n'), ["{tmp}/b.csv"], absent=[OUT]),
    Case("data-parquet-garbage", data_file("b.parquet", b"not parquet at all"), ["{tmp}/b.parquet"], absent=[OUT]),
    Case("data-empty-json-list", data_file("e.json", "[]"), ["{tmp}/e.json", "no rows"], absent=[OUT]),
    Case("data-file-missing", lambda tmp: sft(tmp, f"dataset.source={tmp}/nope.jsonl"),
         ["dataset file not found", "{tmp}/nope.jsonl"], absent=[OUT]),
    # --- columns and rows
    Case("column-missing-instruct", data_file("c.jsonl", jsonl({"prompt": "x", "answer": "y"})),
         ["{tmp}/c.jsonl", "'instruction'", "prompt, answer", "column_map"], absent=[OUT]),
    Case("column-missing-output", data_file("c.jsonl", jsonl({"instruction": "x", "response": "y"})),
         ["{tmp}/c.jsonl", "'output'", "instruction, response", "column_map"], absent=[OUT]),
    Case("column-missing-chat", data_file("c.jsonl", jsonl({"dialog": []}), "chat"),
         ["{tmp}/c.jsonl", "'messages' or 'conversations'", "dialog", "column_map"], absent=[OUT]),
    Case("column-map-to-absent", data_file("c.jsonl", jsonl({"body": "x"}), "text", "dataset.column_map.text=content"),
         ["{tmp}/c.jsonl", "'content'", "body", "column_map"], absent=[OUT]),
    Case("row-messages-not-list", data_file("c.jsonl", jsonl(CHAT, {"messages": "hi"}), "chat"),
         ["{tmp}/c.jsonl row 1", "field 'messages' must be a list"], absent=[OUT]),
    Case("row-unknown-role", data_file("c.jsonl", jsonl({"messages": [{"role": "bot", "content": "x"}]}), "chat"),
         ["{tmp}/c.jsonl row 0", "unknown role 'bot'"], absent=[OUT]),
    Case("row-output-not-string", data_file("c.jsonl", jsonl(ROW, {"instruction": "x", "output": 5})),
         ["{tmp}/c.jsonl", "row 1", "'output' must be a string"], absent=[OUT]),
    # --- nothing to learn from
    Case("targets-all-truncated", lambda tmp: sft(tmp, "tokenizer.max_seq_len=20"),
         ["train.jsonl", "train[:90%]", "no row has a target token", "max_seq_len=20"], absent=[OUT]),
    Case("targets-val-all-truncated", lambda tmp: sft(tmp, "val_dataset.max_seq_len=20", "eval_every_n_steps=1"),
         ["train.jsonl", "train[90%:]", "no row has a target token"], absent=[OUT]),
    Case("targets-none-text", data_file("t.jsonl", jsonl({"text": ""}), "text"),
         ["{tmp}/t.jsonl", "no row has a target token"], absent=[OUT]),
    Case("max-seq-len-negative", lambda tmp: sft(tmp, "tokenizer.max_seq_len=-5"),
         ["'tokenizer.max_seq_len'", ">= 2", "-5"], absent=[OUT]),
    Case("max-seq-len-zero", lambda tmp: sft(tmp, "tokenizer.max_seq_len=0"),
         ["'tokenizer.max_seq_len'", ">= 2"], absent=[OUT]),
    Case("max-seq-len-dataset-one", lambda tmp: sft(tmp, "dataset.max_seq_len=1"),
         ["'dataset.max_seq_len'", ">= 2"], absent=[OUT]),
    # --- tokenizer files
    Case("tokenizer-json-corrupt", model_copy(truncate("tokenizer.json", 100), "tokenizer.path"),
         ["{tmp}/m/tokenizer.json", "not valid JSON at line 1 column"], absent=[OUT]),
    Case("tokenizer-json-empty", model_copy(write("tokenizer.json", ""), "tokenizer.path"),
         ["{tmp}/m/tokenizer.json", "the file is empty"], absent=[OUT]),
    Case("tokenizer-json-list", model_copy(write("tokenizer.json", "[]"), "tokenizer.path"),
         ["{tmp}/m/tokenizer.json", "expected a JSON object"], absent=[OUT]),
    Case("tokenizer-json-not-utf8", model_copy(write("tokenizer.json", b'{"model": "\xfe"}'), "tokenizer.path"),
         ["{tmp}/m/tokenizer.json", "line 1 is not UTF-8"], absent=[OUT]),
    Case("tokenizer-json-vocab-list", model_copy(lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer.json").read_text()), "model": {"type": "BPE", "vocab": [1], "merges": []}})),
        "tokenizer.path"), ["{tmp}/m/tokenizer.json", "not a tokenizer file this can read"], absent=[OUT]),
    Case("tokenizer-config-corrupt", model_copy(write("tokenizer_config.json", '{"eos_token": '), "tokenizer.path"),
         ["{tmp}/m/tokenizer_config.json", "not valid JSON at line 1"], absent=[OUT]),
    Case("tokenizer-none", model_copy(lambda d: (d / "tokenizer.json").unlink(), "tokenizer.path"),
         ["{tmp}/m", "no tokenizer found"], absent=[OUT]),
    Case("tokenizer-model-garbage", model_copy(lambda d: ((d / "tokenizer.json").unlink(),
                                                          (d / "tokenizer.model").write_bytes(b"\x00garbage")),
                                               "tokenizer.path"),
         ["{tmp}/m/tokenizer.model", "not a SentencePiece model"], absent=[OUT]),
    # --- chat templates: which template, from where
    Case("template-file-syntax", model_copy(write("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
                                            "tokenizer.path"),
         ["{tmp}/m/chat_template.jinja", "does not parse", "line 1"], absent=[OUT]),
    Case("template-config-raises", model_copy(edit_json("tokenizer_config.json",
                                                        chat_template="{{ raise_exception('no chats today') }}"),
                                              "tokenizer.path"),
         ["row 0", "{tmp}/m/tokenizer_config.json", "no chats today"], absent=[OUT]),
    Case("template-named-rejects-system", lambda tmp: sft(tmp, "tokenizer.chat_template=gemma2",
                                                          "dataset.system_prompt=Be brief"),
         ["row 0", "named template 'gemma2'", "System role not supported"], absent=[OUT]),
    Case("template-named-rejects-turns", data_file("c.jsonl", jsonl({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}),
        "chat", "tokenizer.chat_template=gemma"),
         ["{tmp}/c.jsonl row 0", "named template 'gemma'", "must alternate"], absent=[OUT]),
    Case("template-needs-bos-token", lambda tmp: sft(tmp, "tokenizer.chat_template=llama2"),
         ["row 0", "named template 'llama2'", "'bos_token' is undefined"], absent=[OUT]),
    Case("template-unknown-name", lambda tmp: sft(tmp, "tokenizer.chat_template=nosuch"),
         ["unknown chat template 'nosuch'"], absent=[OUT]),
    Case("template-given-syntax", template_config("{% if messages %}{{ messages[0].content }}"),
         ["the given chat template", "does not parse", "endif"], absent=[OUT]),
    # --- model files: config.json
    Case("config-heads-indivisible", model_copy(edit_json("config.json", num_attention_heads=3, head_dim=None,
                                                          num_key_value_heads=3)),
         ["{tmp}/m/config.json", "num_attention_heads", "does not divide", "hidden_size"], absent=[OUT]),
    Case("config-kv-heads-indivisible", model_copy(edit_json("config.json", num_key_value_heads=3)),
         ["{tmp}/m/config.json", "num_key_value_heads", "does not divide"], absent=[OUT]),
    Case("config-lacks-key", model_copy(edit_json("config.json", hidden_size=None)),
         ["{tmp}/m/config.json", "'hidden_size'"], absent=[OUT]),
    Case("config-negative-layers", model_copy(edit_json("config.json", num_hidden_layers=-1)),
         ["{tmp}/m/config.json", "num_hidden_layers", "positive"], absent=[OUT]),
    Case("config-corrupt", model_copy(write("config.json", '{"model_type": "llama",')),
         ["{tmp}/m/config.json", "not valid JSON at line 1"], absent=[OUT]),
    Case("config-unknown-model-type", model_copy(edit_json("config.json", model_type="nosuch", architectures=[])),
         ["{tmp}/m/config.json", "unsupported model_type 'nosuch'"], absent=[OUT]),
    # --- tokenizer ids beyond the model's vocabulary
    Case("vocab-tokenizer-too-big", model_copy(lambda d: (edit_json("config.json", vocab_size=200)(d),
                                                          edit_tensors(smaller_vocab)(d))),
         ["does not fit the model", "token id 258", "{tmp}/m/config.json", "vocab_size 200"], absent=[OUT]),
    # --- model files: safetensors
    Case("weights-truncated", model_copy(truncate("model.safetensors", 5000)),
         ["{tmp}/m/model.safetensors", "cannot read safetensors file"], absent=[OUT]),
    Case("weights-foreign", model_copy(write("model.safetensors", b"PK\x03\x04" + bytes(4096))),
         ["{tmp}/m/model.safetensors", "cannot read safetensors file"], absent=[OUT]),
    Case("weights-empty", model_copy(write("model.safetensors", b"")),
         ["{tmp}/m/model.safetensors", "cannot read safetensors file"], absent=[OUT]),
    Case("weights-index-corrupt", model_copy(write("model.safetensors.index.json", '{"weight_map": ')),
         ["{tmp}/m/model.safetensors.index.json", "not valid JSON"], absent=[OUT]),
    Case("weights-index-lists-missing", model_copy(write("model.safetensors.index.json", json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))),
         ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"], absent=[OUT]),
    Case("weights-nan", model_copy(edit_tensors(poison("model.layers.1.mlp.up_proj.weight", float("nan")))),
         ["{tmp}/m/model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "NaN"], absent=[OUT]),
    Case("weights-inf", model_copy(edit_tensors(poison("lm_head.weight", float("-inf")))),
         ["{tmp}/m/model.safetensors", "'lm_head.weight'", "infinite"], absent=[OUT]),
    # --- LoRA adapters (tune merge-lora)
    Case("adapter-config-corrupt", adapter(write("adapter_config.json", '{"peft_type": "LORA",\n "r": }')),
         ["{tmp}/adapter/adapter_config.json", "not valid JSON at line 2"], absent=["merged"]),
    Case("adapter-config-rank-zero", adapter(edit_json("adapter_config.json", r=0)),
         ["{tmp}/adapter/adapter_config.json", "'r' must be a positive number"], absent=["merged"]),
    Case("adapter-weights-truncated", adapter(truncate("adapter_model.safetensors", 300)),
         ["{tmp}/adapter/adapter_model.safetensors", "cannot read safetensors file"], absent=["merged"]),
    Case("adapter-weights-nan", adapter(edit_tensors(poison(LAYER0_Q, float("nan")), "adapter_model.safetensors")),
         ["{tmp}/adapter/adapter_model.safetensors", LAYER0_Q, "NaN"], absent=["merged"]),
    # --- GGUF files (tune convert-gguf)
    Case("gguf-foreign", lambda tmp: ((tmp / "m.gguf").write_bytes(b"PK\x03\x04" + bytes(64)),
                                      ["convert-gguf", str(tmp / "m.gguf"), "--output-dir", str(tmp / "o")])[1],
         ["{tmp}/m.gguf", "not a GGUF file"], absent=["o"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_data(case: Case, tmp_path: Path) -> None:
    check(case, tmp_path)
