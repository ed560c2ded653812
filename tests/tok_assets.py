"""Tokenizer test assets built offline from vocabularies installed in the venv.

`quicktok` ships the real Llama-3 and Qwen3 BPE ranks and `mistral_common` the Mistral-7B-v0.1
SentencePiece model; their files are found by path, the packages are never imported.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable

# A sample that exercises the pre-tokenizer regexes: digits, whitespace runs, punctuation,
# emoji, CJK, code, contractions, accents, unusual whitespace.
SAMPLE = [
    "hello world",
    "Hello, World! How's it going? I'd've thought we'll see.",
    "The year 2024: 3.14159 != 1,000,000; 12345678 apples (x10)",
    "   leading spaces and trailing   ",
    "tabs\tand\t\tnewlines\n\n\nmixed \n \r\n end",
    "emoji 🤗👍🏽 and flags 🇫🇷, ZWJ 👩‍💻",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x >= 10: pass",
    "Ünïcödé naïve café résumé — “quotes” … ½ ² Ⅻ ٣",
    "DON'T SHOUT, it's ok. They're here, we've gone, you'll see, I'm fine",
    "nbsp\u00a0thin\u2009ideographic\u3000space \x0b\x0c vt-ff",
    "https://example.com/path?q=1&r=two#frag user@mail.org",
    "",
]


def package_file(package: str, relative: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / relative


def quicktok_ranks(name: str) -> dict[bytes, int]:
    """quicktok's `<name>.vocab`: <I count> then (<H len> bytes <I rank>)*, little-endian."""
    data = package_file("quicktok", f"data/{name}.vocab").read_bytes()
    (count,), offset, ranks = struct.unpack_from("<I", data), 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 6 + length
    assert offset == len(data)
    return ranks


def quicktok_specials(name: str) -> dict[str, int]:
    """quicktok's `<name>.special`: <I count> then (<I id> <H len> utf-8)*."""
    data = package_file("quicktok", f"data/{name}.special").read_bytes()
    (count,), offset, specials = struct.unpack_from("<I", data), 4, {}
    for _ in range(count):
        id_, length = struct.unpack_from("<IH", data, offset)
        specials[data[offset + 6 : offset + 6 + length].decode()] = id_
        offset += 6 + length
    assert offset == len(data)
    return specials


def write_tiktoken_file(ranks: dict[bytes, int], path: Path) -> Path:
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    path.write_text("".join(lines))
    return path


def cached_file(name: str, build: Callable[[Path], object]) -> Path:
    """`build(path)` once into the test cache ($TUNEWRIGHT_CACHE), shared by xdist workers and
    later runs; keyed by the versions of the libraries that make the reference files."""
    versions = "-".join(importlib.metadata.version(p) for p in ("tokenizers", "transformers", "quicktok-v1"))
    path = Path(os.environ.get("TUNEWRIGHT_CACHE", tempfile.gettempdir())) / "tokenizers" / versions / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        build(partial)
        os.replace(partial, path)  # atomic: a concurrent worker sees all of it or nothing
    return path


def write_hf_tokenizer_json(
    ranks_file: Path, pattern: str, specials: dict[str, int], path: Path, *, nfc: bool
) -> Path:
    """An HF tokenizer.json converted from a tiktoken ranks file by transformers' converter."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ordered = sorted(specials, key=specials.get)
    tokenizer = TikTokenConverter(str(ranks_file), pattern=pattern, extra_special_tokens=ordered).converted()
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.save(str(path))
    # The converter numbers added tokens after the ranks, in order; check it matched ours.
    saved = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert saved == specials, "special token ids differ from the vocabulary's"
    return path


# -- shared by tests/test_tokenizers_families.py ----------------------------------------------

# What tokenizers get wrong first: long numbers (Llama-3 groups digits by three, Qwen splits
# them one by one), runs of spaces/tabs/newlines and trailing whitespace (the `\s+(?!\S)`
# branch), emoji with skin tones and ZWJ sequences (multi-token characters), CJK, combining
# accents, code, and special-token look-alikes.
FAMILY_SAMPLE = [
    *SAMPLE,
    "12345678901234567890 and 3.141592653589793, 1e-10, -42, 0x1F, 1_000_000",
    "trailing spaces   ",
    "  two leading, \t\t tabs,\n\n\n\nnewlines \n\t \n  and a final newline\n",
    "      deep indent\n        more\n\tmixed\t \t",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🧑🏿‍🚀 astronaut, ❤️‍🔥, 1️⃣ keycap",
    "日本語の文章です。中文句子，标点！ 한국어 문장입니다. ภาษาไทย العربية",
    "Crème brûlée, façade, Ærøskøbing, Ångström, naïve, São Paulo, Dvořák, Łódź",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i]; // dot\n}\nprint(f\"{x!r:>10}\")",
    "<|not_a_token|> <s > </ s> [INST ] <|im_start |> <<SYS>>",
]


def quicktok_tokenizer_json(name: str, pattern: str, *, nfc: bool) -> Path:
    """The cached HF tokenizer.json of quicktok's `name` vocabulary (transformers' converter)."""

    def build(path: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ranks_file = write_tiktoken_file(quicktok_ranks(name), Path(tmp) / "ranks.tiktoken")
            write_hf_tokenizer_json(ranks_file, pattern, quicktok_specials(name), path, nfc=nfc)

    return cached_file(f"{name}-tokenizer.json", build)


def sentencepiece_vocab_merges(model_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece BPE model as HF vocab + merges (merges ranked by piece score, as
    transformers' converter does), read without protobuf."""
    import sentencepiece
    from transformers.convert_slow_tokenizer import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return vocab, generate_merges(vocab, {piece: sp.get_score(i) for piece, i in vocab.items()})


def byte_level_tokenizer_dir(
    directory: Path, specials: list[str], *, flags: dict[str, dict] | None = None, config: dict | None = None
) -> Path:
    """training/tiny_assets' byte-level tokenizer.json (one token per byte) with `specials` at
    ids 256.., their lstrip/rstrip `flags`, and `config` as tokenizer_config.json."""
    from tunewright.training.tiny_assets import byte_level_tokenizer_json

    data = byte_level_tokenizer_json()
    base = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    data["added_tokens"] = [
        {**base, **(flags or {}).get(t, {}), "id": 256 + i, "content": t} for i, t in enumerate(specials)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
