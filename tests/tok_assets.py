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
