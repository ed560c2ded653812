"""A model directory's tokenizer as GGUF metadata, as llama.cpp's converter writes it (the
inverse of `gguf_tokenizer.py`).

Two kinds, by what the directory holds:
- byte-level BPE `tokenizer.json` -> `tokenizer.ggml.model = gpt2`: tokens as spelt, merges as
  "left right", and the pre-tokenizer's llama.cpp name (`tokenizer.ggml.pre`), found by
  matching the file's pre-tokenizer against the ones `gguf_tokenizer.PRE_TOKENIZERS` writes
  for each name (plus Qwen2's); llama.cpp hard-codes the regex per name, so an unknown one
  fails here rather than tokenizing differently there;
- SentencePiece `tokenizer.model` -> `llama`: pieces, scores and piece types from the model.
Added tokens are CONTROL (special) or USER_DEFINED; rows of the embedding past the tokenizer's
last id get `[PAD<id>]` tokens of type UNUSED, as llama.cpp pads them. bos/eos/pad ids and the
chat template are what `load_tokenizer` (training's view of the directory) finds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewright.data.tokenizer.bpe import QWEN2_PATTERN
from tunewright.models.gguf_tokenizer import PRE_TOKENIZERS

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
_PAD_SCORE = -1000.0  # llama.cpp's score for added and padding pieces


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece only
    merges: list[str] | None  # BPE only
    special: dict[str, int]  # bos / eos / pad / unk -> id
    add_bos: bool
    chat_template: str | None
    space_prefix: bool | None = None  # SentencePiece: whether it prepends "▁" (Gemma's does not)


def _signature(pre: dict[str, Any] | None, normalizer: dict[str, Any] | None = None) -> str:
    """What decides how text is split, without the keys that do not (offsets)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in sorted(node.items()) if k not in ("trim_offsets", "invert")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return json.dumps([strip(pre), strip(normalizer)], sort_keys=True)


def _known_pre_tokenizers() -> dict[str, str]:
    known: dict[str, str] = {}
    for name, (pre, _) in PRE_TOKENIZERS.items():  # first name wins: llama-bpe before its aliases
        known.setdefault(_signature(pre), name)
    split = {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated"}
    qwen2 = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "add_prefix_space": False,
                                                            "use_regex": False}]}
    known[_signature(qwen2, {"type": "NFC"})] = "qwen2"
    return known


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The tokenizer of `model_dir` for an embedding of `vocab_size` rows; one line naming the
    file when it cannot be written as llama.cpp reads it."""
    from tunewright.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    template = tok.chat_format.template if tok.chat_format is not None else None
    config = _read_json(model_dir / "tokenizer_config.json")
    json_file, model_file = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    data = _read_json(json_file)
    bpe = data.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    if bpe.get("type") == "BPE" and not bpe.get("byte_fallback") and byte_level:
        vocab = _bpe_vocab(data, json_file)
        added = {t["id"]: t for t in data.get("added_tokens") or []}
    elif model_file.is_file():
        vocab = _sentencepiece_vocab(model_file)
        added = {int(i): {"content": t["content"], "special": t.get("special", False)}
                 for i, t in (config.get("added_tokens_decoder") or {}).items()}
    else:
        raise ValueError(f"{model_dir}: no tokenizer llama.cpp can read (a byte-level BPE tokenizer.json "
                         "or a SentencePiece tokenizer.model)")
    num_base = len(vocab.tokens)  # the model's own tokens; added ones may lie past them
    for id_, token in added.items():
        while len(vocab.tokens) <= id_:
            vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
            vocab.types.append(UNUSED)
        if id_ >= num_base or vocab.types[id_] == NORMAL:
            vocab.tokens[id_] = token["content"]
            vocab.types[id_] = CONTROL if token.get("special") else USER_DEFINED
    if len(vocab.tokens) > vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {len(vocab.tokens)} tokens but the embedding only "
                         f"{vocab_size} rows (config.json vocab_size)")
    for i in range(len(vocab.tokens), vocab_size):  # embedding rows no token uses
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
    for i, token in enumerate(vocab.tokens):  # ids the vocabulary skips
        if token == "":
            vocab.tokens[i], vocab.types[i] = f"[PAD{i}]", UNUSED
    unk = config.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    if unk in vocab.tokens:
        special["unk"] = vocab.tokens.index(unk)
    scores = None if vocab.scores is None else vocab.scores + [_PAD_SCORE] * (vocab_size - len(vocab.scores))
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # SentencePiece tokenizers add it by default; BPE ones when their template does
        add_bos = vocab.model == "llama" or _post_processor_adds(data, tok.bos_id)
    return Vocab(vocab.model, vocab.pre, vocab.tokens, vocab.types, scores, vocab.merges,
                 {k: v for k, v in special.items() if v is not None}, bool(add_bos), template,
                 vocab.space_prefix)


@dataclass
class _Base:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    space_prefix: bool | None = None


def _bpe_vocab(data: dict[str, Any], path: Path) -> _Base:
    pre = _known_pre_tokenizers().get(_signature(data.get("pre_tokenizer"), data.get("normalizer")))
    if pre is None:
        raise ValueError(f"{path}: this pre-tokenizer has no llama.cpp name (tokenizer.ggml.pre); we "
                         "export GPT-2's, SmolLM's, Llama-3's and Qwen2's")
    vocab: dict[str, int] = data["model"]["vocab"]
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for token, id_ in vocab.items():
        tokens[id_] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]
    return _Base("gpt2", pre, tokens, [NORMAL] * len(tokens), None, merges)


def _sentencepiece_vocab(path: Path) -> _Base:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    # As SentencePieceTokenizer tells: does encoding "a" give "▁a"?
    space_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")
    return _Base("llama", "default", tokens, types, scores, None, space_prefix)


def _post_processor_adds(data: dict[str, Any], bos_id: int | None) -> bool:
    single = (data.get("post_processor") or {}).get("single") or []
    specials = (data.get("post_processor") or {}).get("special_tokens") or {}
    return bos_id is not None and any(
        bos_id in (specials.get(t["SpecialToken"]["id"]) or {}).get("ids", []) for t in single if "SpecialToken" in t)


def _read_json(path: Path) -> dict[str, Any]:
    from tunewright.data.files import read_json

    return read_json(path) if path.is_file() else {}


def write_vocab(w: Any, v: Vocab) -> None:
    """`v` as llama.cpp's tokenizer keys on the gguf writer `w`."""
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
              "unk": w.add_unk_token_id}
    for role, id_ in v.special.items():
        adders[role](id_)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
    if v.space_prefix is not None:
        w.add_add_space_prefix(v.space_prefix)
    if v.chat_template is not None:
        w.add_chat_template(v.chat_template)
