"""A GGUF's tokenizer metadata as HF `tokenizer.json` + `tokenizer_config.json`.

Only `tokenizer.ggml.model = gpt2` (byte-level BPE) is supported: its tokens are already spelt
in GPT-2's byte-to-unicode alphabet and its merges are "left right" strings, exactly what an
HF BPE model holds. What a GGUF does not store is the pre-tokenizer: it names it
(`tokenizer.ggml.pre`) and llama.cpp hard-codes the regexes per name, so we do the same with a
table of the names we can reproduce; any other name fails rather than tokenizing slightly
differently from the model's training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# Llama-3's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3, HF Llama-3 tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, {**_BYTE_LEVEL, "use_regex": False}]}


# tokenizer.ggml.pre -> (HF pre_tokenizer, BPE ignore_merges) matching llama.cpp's regexes.
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool]] = {
    "gpt-2": (_BYTE_LEVEL, False),
    # SmolLM: each digit on its own, then the GPT-2 regex.
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}, False),
    "llama-bpe": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "llama3": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "smaug-bpe": (_split_then_bytes(_LLAMA3_SPLIT), True),
}
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2  # llama.cpp token types
ROLES = ("bos", "eos", "unk", "pad")
_ROLE_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
              "pad": "padding_token_id"}


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """bos/eos/unk/pad (+ eot, the end of a chat turn) ids the file declares."""
    ids = {role: meta[f"tokenizer.ggml.{key}"] for role, key in _ROLE_KEYS.items()
           if f"tokenizer.ggml.{key}" in meta}
    if "tokenizer.ggml.eot_token_id" in meta:
        ids["eot"] = meta["tokenizer.ggml.eot_token_id"]
    return ids


def hf_tokenizer_files(meta: dict[str, Any], path: Path, *, max_length: int) -> dict[str, dict[str, Any]]:
    """`{"tokenizer.json": ..., "tokenizer_config.json": ...}` for the file's tokenizer."""
    from tunewright.training.tiny_assets import bytes_to_unicode

    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: has no tokenizer (no tokenizer.ggml.model)")
    if model != "gpt2":
        kind = " (SentencePiece)" if model == "llama" else ""
        raise ValueError(f"{path}: tokenizer model '{model}'{kind} is not supported; only 'gpt2' "
                         "(byte-level BPE) is")
    pre = meta.get("tokenizer.ggml.pre", "<missing>")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported "
                         f"(supported: {', '.join(PRE_TOKENIZERS)})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens/token_type are missing or of different lengths")
    ids = special_ids(meta)
    for role, id_ in ids.items():
        if not 0 <= id_ < len(tokens):
            raise ValueError(f"{path}: {role} token id {id_} is outside the {len(tokens)}-token vocabulary")

    alphabet = set(bytes_to_unicode().values())
    role_ids = set(ids.values())
    added: list[dict[str, Any]] = []
    for id_, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_CONTROL, _USER_DEFINED, _UNKNOWN) or id_ in role_ids:
            # Matched whole in the text (special ones are also skipped when decoding).
            added.append({"id": id_, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": kind != _USER_DEFINED})
        elif not set(token) <= alphabet:
            raise ValueError(f"{path}: token {id_} {token!r} is not spelt in the byte-level alphabet")
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}: bad merge {merge!r} in tokenizer.ggml.merges")
        merges.append(pair)
    vocab = {}
    for id_, token in enumerate(tokens):
        vocab.setdefault(token, id_)  # a duplicate spelling keeps its first id, as llama.cpp does

    names = {role: tokens[id_] for role, id_ in ids.items()}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and "bos" in names
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in names
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(names, ids, add_bos, add_eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": names.get(role) for role in ROLES},
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
    }
    template = _chat_template(meta)
    if template is not None:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}


def _post_processor(names: dict[str, str], ids: dict[str, int], add_bos: bool, add_eos: bool) -> dict | None:
    if not (add_bos or add_eos):
        return None
    roles = [r for r, on in (("bos", add_bos), ("eos", add_eos)) if on]
    special = {names[r]: {"id": names[r], "ids": [ids[r]], "tokens": [names[r]]} for r in roles}

    def tok(role: str, type_id: int) -> dict:
        return {"SpecialToken": {"id": names[role], "type_id": type_id}}

    def seq(name: str, type_id: int) -> list[dict]:
        body = [{"Sequence": {"id": name, "type_id": type_id}}]
        return ([tok("bos", type_id)] if add_bos else []) + body + ([tok("eos", type_id)] if add_eos else [])

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": special}


def _chat_template(meta: dict[str, Any]) -> str | list[dict[str, str]] | None:
    default = meta.get("tokenizer.chat_template")
    named = {k.removeprefix("tokenizer.chat_template."): v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.")}
    if not named:
        return default
    # HF's form for several templates (tool_use, rag, ...): a list with a "default" entry.
    entries = ([{"name": "default", "template": default}] if default is not None else [])
    return entries + [{"name": n, "template": t} for n, t in named.items()]
