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
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from tunewright.data.tokenizer.bpe import LLAMA3_PATTERN

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


# -- family tokenizer directories and their transformers references ---------------------------
# Shared by tests/test_tokenizers_families.py and tests/test_chat_masks.py. Gemma's and Phi-3's
# real vocabularies are not installable offline: Gemma is a byte-level stand-in with its special
# tokens, Phi-3 the Llama-2-kind SentencePiece model of Mistral v1 plus Phi-3's added tokens and
# rstrip flags (which is how Phi-3-mini's own tokenizer is built).

QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
MISTRAL_V1, MISTRAL_V3 = "data/tokenizer.model.v1", "data/mistral_instruct_tokenizer_240323.model.v3"
# Phi-3-mini-4k-instruct's added tokens (ids 32000-32010) and their rstrip flags.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", *[f"<|placeholder{i}|>" for i in range(1, 5)], "<|system|>",
              "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI3_FLAGS = {t: {"rstrip": t != "<|endoftext|>", "lstrip": False} for t in PHI3_ADDED}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False))


def qwen_tokenizer_json() -> Path:
    return quicktok_tokenizer_json("qwen3", QWEN_PATTERN, nfc=True)


def qwen_dir(directory: Path) -> Path:
    """A Qwen2.5-Instruct directory minus its chat template: config.json says qwen2."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(qwen_tokenizer_json(), directory / "tokenizer.json")
    write_json(directory / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>",
                                                     "pad_token": "<|endoftext|>"})
    write_json(directory / "config.json", {"model_type": "qwen2"})
    return directory


def qwen_reference():
    """transformers' Qwen2Tokenizer on quicktok's Qwen vocabulary: its own regex and NFC, not ours."""
    import transformers

    data = json.loads(qwen_tokenizer_json().read_text())
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    ref = transformers.Qwen2Tokenizer(vocab=data["model"]["vocab"], merges=merges)  # adds <|endoftext|>
    ref.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ref.eos_token = "<|im_end|>"  # Qwen2.5-Instruct's
    return ref


def llama3_dir(directory: Path) -> Path:
    """Llama-3 as Meta ships it: a tiktoken ranks file named tokenizer.model."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tiktoken_file(quicktok_ranks("llama3"), directory / "tokenizer.model")
    write_json(directory / "config.json", {"model_type": "llama"})
    return directory


def llama3_reference():
    import transformers

    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    path = quicktok_tokenizer_json("llama3", LLAMA3_PATTERN, nfc=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), **names)


def sentencepiece_controls(model_file: Path) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]


def llama_reference(model_file: Path, *, legacy: bool, added: Sequence[tuple[str, dict]] = ()):
    """An HF tokenizer of a SentencePiece BPE model. legacy=False is transformers' own
    LlamaTokenizer (Metaspace, prepend_scheme "first", as Mistral-v0.3's tokenizer.json);
    legacy=True the Prepend/Replace normaliser of Llama-2's and Mistral-v0.1's tokenizer.json."""
    import tokenizers
    import transformers
    from tokenizers import AddedToken, decoders, models, normalizers

    vocab, merges = sentencepiece_vocab_merges(model_file)
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if legacy:
        model = models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        tok = tokenizers.Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    else:
        ref = transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, **names)
    specials = [AddedToken(t, normalized=False, special=True) for t in sentencepiece_controls(model_file)]
    ref._tokenizer.add_special_tokens(specials)
    for content, flags in added:  # in id order: each gets the next id
        ref._tokenizer.add_special_tokens([AddedToken(content, normalized=False, special=True, **flags)])
    return ref


def mistral_v1_dir(directory: Path) -> Path:
    """Mistral-7B-v0.1 (and Llama-2's kind): a legacy SentencePiece tokenizer.model only."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_file("mistral_common", MISTRAL_V1), directory / "tokenizer.model")
    write_json(directory / "config.json", {"model_type": "mistral"})
    return directory


def mistral_v1_reference():
    return llama_reference(package_file("mistral_common", MISTRAL_V1), legacy=True)


def mistral_v3_reference():
    return llama_reference(package_file("mistral_common", MISTRAL_V3), legacy=False)


def mistral_v3_dir(directory: Path) -> Path:
    """Mistral-7B-Instruct-v0.3: tokenizer.model and a non-legacy tokenizer_config."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_file("mistral_common", MISTRAL_V3), directory / "tokenizer.model")
    write_json(directory / "tokenizer_config.json", {"legacy": False, "bos_token": "<s>", "eos_token": "</s>"})
    write_json(directory / "config.json", {"model_type": "mistral"})
    return directory


def phi3_dir(directory: Path) -> Path:
    """Phi-3-mini's layout: a Llama-2-kind tokenizer.model plus added tokens, with their
    rstrip flags, listed in tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_file("mistral_common", MISTRAL_V1), directory / "tokenizer.model")
    entry = {"special": True, "normalized": False, "single_word": False}
    added = {str(32000 + i): {"content": t, **entry, **PHI3_FLAGS[t]} for i, t in enumerate(PHI3_ADDED)}
    config = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<unk>", "added_tokens_decoder": added}
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "config.json", {"model_type": "phi3"})
    return directory


def phi3_reference():
    ref = llama_reference(package_file("mistral_common", MISTRAL_V1), legacy=True,
                          added=[(t, PHI3_FLAGS[t]) for t in PHI3_ADDED])
    ref.eos_token = "<|endoftext|>"
    return ref


def gemma_dir(directory: Path) -> Path:
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    byte_level_tokenizer_dir(directory, GEMMA_SPECIALS, config=config)
    write_json(directory / "config.json", {"model_type": "gemma3_text"})
    return directory


def gemma_reference(directory: Path):
    import transformers

    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **names)


def qwen_vocab_merges_dir(directory: Path, *, config: dict) -> Path:
    """quicktok's Qwen vocabulary as GPT-2 style `vocab.json` + `merges.txt` (no tokenizer.json),
    with `config` as tokenizer_config.json."""

    def build_vocab(path: Path) -> None:
        data = json.loads(qwen_tokenizer_json().read_text())
        path.write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False))

    def build_merges(path: Path) -> None:
        data = json.loads(qwen_tokenizer_json().read_text())
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(cached_file("qwen-vocab.json", build_vocab), directory / "vocab.json")
    shutil.copy(cached_file("qwen-merges.txt", build_merges), directory / "merges.txt")
    write_json(directory / "tokenizer_config.json", config)
    return directory


def random_strings(seed: int, count: int) -> list[str]:
    """Strings that stress a pre-tokenizer: digit runs, whitespace runs, CJK, accents composed and
    decomposed (NFC changes those), emoji sequences, code, contractions."""
    import random

    rng = random.Random(seed)
    parts = ["12345", "3.14", " 42", "2024", "  ", "   ", "\n", "\n\n", " \n ", "\t", "\r\n", "hello",
             " world", "Café", "Cafe\u0301", "A\u030a", "n\u0303o", "e\u0301te\u0301", "ﬁ", "中文", "日本語の",
             "한국어", "🤗", "👩\u200d💻", "🇫🇷", "def f(x):", "    return", "{'a': [1, 2]}", "x >= 10;", "I'd've",
             "DON'T", "'s", "...", "—", "½", "\u00a0", "\u3000", "<|im_start|>", "<|im_end|>", "\u200b"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(count)]
