"""Convert HF byte-level BPE files (`tokenizer.json`, `vocab.json` + `merges.txt`) for tiktoken.

HF writes each token as a string in GPT-2's byte-to-unicode alphabet and orders merges by
priority; tiktoken wants token bytes -> rank, where the lowest-ranked concatenation merges
first. Both agree when rank == id and ids grow along the merge list, which holds for the files
of GPT-2, Llama-3, Qwen and SmolLM2; otherwise ranks are taken from merge order and mapped
back to ids. The pre-tokenizer becomes one regex: only the shapes real models use are
accepted, anything else fails loudly instead of tokenizing slightly differently.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from tunewright.data.files import check_text_file, read_json
from tunewright.data.tokenizer.added import flags_of
from tunewright.data.tokenizer.bpe import GPT2_PATTERN, QWEN2_PATTERN

# After an HF `Digits` split the GPT-2 regex runs on digit-free pieces: digits become their
# own alternative and the end-of-piece lookahead `(?!\S)` must also stop before a digit.
_GPT2_AFTER_DIGITS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
_NORMALIZATIONS = ("NFC", "NFD", "NFKC", "NFKD")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[int, int]:
    """GPT-2's printable stand-in character (as a code point) -> the byte it encodes.

    Shaped for `str.translate`: `text.translate(table).encode("latin-1")` gives the bytes.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = b
        else:
            table[256 + extra] = b
            table[b] = 0x10FFFF  # not a stand-in: make it fail to encode
            extra += 1
    return table


def read_tokenizer_json(path: str | Path) -> dict[str, Any]:
    """Keyword arguments of `BPETokenizer` for a byte-level BPE `tokenizer.json`."""
    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: BPE with subword prefix/suffix is not byte-level BPE")
    pattern = _pattern(data.get("pre_tokenizer"), path)
    normalization = _normalization(data.get("normalizer"), path)
    added, added_flags, special_ids = read_added_tokens(data)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    kwargs = convert_vocab(model["vocab"], merges, added, path)
    return {
        **kwargs,
        "pattern": pattern,
        "special_ids": special_ids,
        "normalization": normalization,
        "added_flags": added_flags,
    }


def read_added_tokens(data: dict[str, Any]) -> tuple[dict[str, int], dict[str, dict[str, bool]], list[int]]:
    """A parsed `tokenizer.json`'s added tokens: text -> id, their strip flags, the special ids."""
    entries = data.get("added_tokens") or []
    added = {t["content"]: t["id"] for t in entries}
    special_ids = [t["id"] for t in entries if t.get("special", True)]
    return added, flags_of(entries), special_ids


def sentencepiece_prefix(data: dict[str, Any], path: str | Path) -> str:
    """Where a SentencePiece-style `tokenizer.json` puts the "▁" that stands for a leading space.

    "legacy": in front of every piece of text between added tokens (a `Prepend` normaliser, as
    SentencePiece itself does); otherwise its `Metaspace` pre-tokenizer's prepend scheme:
    "first" (only the text at the very start), "always" or "never", each skipped when the
    text already starts with a space. Its `split` is not followed: runs of spaces are encoded as
    SentencePiece does (see `sentencepiece.py`).
    """
    normalizers = _steps(data.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" for n in normalizers):
        return "legacy"
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")
            if scheme is None:  # files from before prepend_scheme existed
                scheme = "always" if step.get("add_prefix_space", True) else "never"
            if scheme not in ("first", "always", "never"):
                raise ValueError(f"{path}: unknown Metaspace prepend_scheme {scheme!r}")
            return scheme
    return "legacy"


def _steps(node: dict | None, key: str) -> list[dict]:
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def read_vocab_merges(
    vocab_path: str | Path,
    merges_path: str | Path,
    added_tokens: dict[str, int] | None = None,
    *,
    tokenizer_class: str | None = None,
    model_type: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `BPETokenizer` for `vocab.json` + `merges.txt`.

    These files hold no pre-tokenizer or normaliser: transformers takes them from the tokenizer
    class (tokenizer_config.json `tokenizer_class`, else the one it maps `model_type` to).
    Qwen2Tokenizer, which Qwen2/2.5/3 use, splits with its own regex and NFC-normalises; the
    others we accept are GPT-2's regex alone.
    """
    vocab = read_json(vocab_path, what="a JSON object of token -> id")
    check_text_file(merges_path)
    merges = []
    for line in Path(merges_path).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, _, right = line.partition(" ")
            merges.append((left, right))
    kwargs = convert_vocab(vocab, merges, dict(added_tokens or {}), merges_path)
    if tokenizer_class is not None:
        qwen = tokenizer_class.removesuffix("Fast") == "Qwen2Tokenizer"
    else:  # transformers maps every qwen2*/qwen3* model type to Qwen2Tokenizer
        qwen = (model_type or "").startswith(("qwen2", "qwen3"))
    if qwen:
        return {**kwargs, "pattern": QWEN2_PATTERN, "normalization": "NFC"}
    return {**kwargs, "pattern": GPT2_PATTERN}


def convert_vocab(
    vocab: dict[str, int], merges: list[tuple[str, ...]], added: dict[str, int], path: str | Path
) -> dict[str, Any]:
    """tiktoken ranks (+ rank -> id map when needed) from an HF vocabulary and merge list."""
    table = byte_decoder()
    added_ids = set(added.values())
    token_bytes: dict[int, bytes] = {}
    for text, id_ in vocab.items():
        if id_ in added_ids:
            continue  # recognised in text instead, as HF does
        # Code points outside the alphabet survive translate and then fail to encode.
        try:
            token_bytes[id_] = text.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{path}: token {text!r} is not in the byte-level alphabet") from None
    singles = {b: id_ for id_, b in token_bytes.items() if len(b) == 1}  # bytes it lacks: see BPETokenizer

    merged: list[int] = []  # ids produced by merges, in merge priority order
    seen: set[int] = set()
    for pair in merges:
        if len(pair) != 2:
            raise ValueError(f"{path}: bad merge {pair!r}")
        id_ = vocab.get(pair[0] + pair[1])
        if id_ is None:
            raise ValueError(f"{path}: merge {pair!r} gives a token missing from the vocabulary")
        if id_ not in seen and id_ not in added_ids:
            seen.add(id_)
            merged.append(id_)
    # Tokens no merge can build (added tokens stored in the vocab, leftovers) only decode.
    decode_only = {i: b for i, b in token_bytes.items() if len(b) > 1 and i not in seen}

    if all(a < b for a, b in zip(merged, merged[1:])):
        ranks = {token_bytes[i]: i for i in [*singles.values(), *merged]}
        return {"ranks": ranks, "ids": None, "added_tokens": added, "decode_only": decode_only}
    order = sorted(singles.values()) + merged
    ranks = {token_bytes[i]: rank for rank, i in enumerate(order)}
    return {"ranks": ranks, "ids": order, "added_tokens": added, "decode_only": decode_only}


def _pattern(pre: dict | None, path: str | Path) -> str:
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
    else:
        steps = [pre] if pre else []
    kinds = [s["type"] for s in steps]
    if "ByteLevel" not in kinds:
        raise ValueError(f"{path}: pre-tokenizer {kinds} is not byte-level (SentencePiece-style BPE?)")
    byte_level = steps[kinds.index("ByteLevel")]
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported")
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and use_regex:
        digits = r"\p{N}|" if steps[0].get("individual_digits") else r"\p{N}+|"
        return digits + _GPT2_AFTER_DIGITS
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex")
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"{path}: only an isolated, non-inverted Regex Split is supported, got {split}")
        return regex
    raise ValueError(f"{path}: unsupported pre-tokenizer sequence {kinds} (ByteLevel use_regex={use_regex})")


def _normalization(normalizer: dict | None, path: str | Path) -> str | None:
    if normalizer is None:
        return None
    if normalizer.get("type") == "Sequence" and not normalizer.get("normalizers"):
        return None
    if normalizer.get("type") in _NORMALIZATIONS:
        return normalizer["type"]
    raise ValueError(f"{path}: unsupported normalizer {normalizer.get('type')!r} for byte-level BPE")
