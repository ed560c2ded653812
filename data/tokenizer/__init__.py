"""Tokenizers: one `Tokenizer` protocol, two engines, Jinja chat formatting, one loader.

    base.py           the Tokenizer protocol, Message, IGNORE_INDEX
    bpe.py            BPETokenizer: byte-level BPE on tiktoken (Llama-3, Qwen, SmolLM2, GPT-2)
    hf_bpe.py         HF tokenizer.json / vocab.json+merges.txt -> tiktoken ranks and regex
    added.py          AddedTokens: added/special tokens found in text as HF does (lstrip/rstrip)
    sentencepiece.py  SentencePieceTokenizer (Llama-2, Mistral tokenizer.model)
    chat.py           ChatFormat: chat templates rendered as transformers does, assistant masks
    turns.py          where each assistant turn lies in the rendered text (marks, no search)
    templates/        the families' published Jinja chat templates, by name (see its README)

`load_tokenizer` picks the engine from the files of a model directory. Nothing here is imported
at CLI start: tiktoken, sentencepiece and jinja2 load only when a tokenizer is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from tunewright.data.files import check_text_file, read_json
from tunewright.data.tokenizer.added import flags_of
from tunewright.data.tokenizer.base import IGNORE_INDEX, Message, TokenCount, Tokenizer

__all__ = ["IGNORE_INDEX", "Message", "Tokenizer", "load_tokenizer"]

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+$")


def load_tokenizer(
    path: str | Path, *, chat_template: str | None = None, max_seq_len: TokenCount | None = None
) -> Tokenizer:
    """The tokenizer stored at `path`: a model directory or one tokenizer file.

    In a directory the engine comes from the first of `tokenizer.json` (byte-level BPE),
    `vocab.json` + `merges.txt` (split as its tokenizer class does: Qwen2Tokenizer's regex and
    NFC, else GPT-2's), `tokenizer.model` (a SentencePiece model or a tiktoken ranks
    file like Llama-3's; a SentencePiece-style `tokenizer.json` defers to it). bos/eos/pad and
    the chat template come from `tokenizer_config.json`, `special_tokens_map.json`,
    `chat_template.jinja` and `generation_config.json` beside it, whose eos ids also stop
    generation. The chat template is, first to last: `chat_template` (Jinja source or a name in
    `chat.NAMED_TEMPLATES`: chatml, qwen2_5, llama3, llama3_2, llama2, mistral, mistral_v3,
    gemma, gemma2, phi3), the model's own (`chat_template.jinja` or tokenizer_config.json), the
    named template of its family (config.json `model_type`, else its special tokens).
    `max_seq_len` cuts `tokenize_messages` output to that many tokens.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer path {path} does not exist")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"tokenizer max_seq_len must be a whole number of tokens, at least 2; got {max_seq_len!r}")
    directory = path if path.is_dir() else path.parent
    config = _read_config(directory)
    engine, kwargs = _engine(path, config)
    added = {**config["added"], **(kwargs.get("added_tokens") or {})}
    for role in ("bos", "eos", "pad"):
        if added.get(config[role]) is not None:
            kwargs[f"{role}_id"] = added[config[role]]
    if "eos_id" not in kwargs and config["eos_ids"]:
        kwargs["eos_id"] = config["eos_ids"][0]
    if "pad_id" not in kwargs and config["pad_token_id"] is not None:
        kwargs["pad_id"] = config["pad_token_id"]
    try:
        tok = engine(**kwargs, stop_ids=config["eos_ids"])
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None

    template, origin = _chat_template(chat_template, config, tok.added_tokens)
    if template is not None:
        from tunewright.data.tokenizer.chat import ChatFormat

        # The variables transformers passes to templates (its special_tokens_map).
        roles = ("bos", "eos", "pad", "unk")
        template_vars = {f"{role}_token": config[role] for role in roles if config[role]}
        for role, id_ in (("bos", tok.bos_id), ("eos", tok.eos_id)):
            if f"{role}_token" not in template_vars and id_ is not None:
                template_vars[f"{role}_token"] = tok.id_to_token(id_)
        tok.chat_format = ChatFormat(template, template_vars=template_vars, origin=origin)
        tok.stop_ids = tok.stop_ids | set(tok.chat_format.end_of_turn_ids(tok.added_tokens))
    tok.max_seq_len = max_seq_len
    return tok


def _chat_template(given: str | None, config: dict[str, Any], added: dict[str, int]) -> tuple[str | None, str | None]:
    """The template (Jinja or a name) and where it came from, for errors: the argument, the
    model's own file, else the named template of its family."""
    if given:
        return given, None  # a name says itself; Jinja source is "the given chat template"
    if config["chat_template"]:
        return config["chat_template"], config["chat_template_origin"]
    name = _default_template(added, config["model_type"])
    family = f"model_type {config['model_type']!r}" if config["model_type"] else "its special tokens"
    return name, name and f"named template {name!r}, the default for {family}"


def _engine(path: Path, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The engine class and its keyword arguments for the tokenizer file(s) at `path`."""
    from tunewright.data.tokenizer import hf_bpe
    from tunewright.data.tokenizer.bpe import BPETokenizer, read_tiktoken_file
    from tunewright.data.tokenizer.sentencepiece import SentencePieceTokenizer

    json_file = vocab = merges = model_file = None
    if path.is_dir():
        json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
        vocab, merges = path / "vocab.json", path / "merges.txt"
    elif path.name == "vocab.json":
        vocab, merges = path, path.parent / "merges.txt"
    elif path.suffix == ".json":
        json_file, model_file = path, path.parent / "tokenizer.model"
    else:
        model_file = path

    sentencepiece_json: dict[str, Any] = {}
    if json_file and json_file.is_file():
        try:
            return BPETokenizer, _parse(hf_bpe.read_tokenizer_json, json_file)
        except ValueError:
            if not (model_file and model_file.is_file()):
                raise  # else: a SentencePiece-style tokenizer.json, use the model file instead
            sentencepiece_json = _read_json(json_file)
    # Added tokens named only in tokenizer_config.json (tokenizer.json lists its own).
    config_special = {"special_ids": config["special_ids"]} if config["added"] else {}
    config_special["added_flags"] = config["added_flags"]
    if vocab and merges and vocab.is_file() and merges.is_file():
        vocab_ids = read_json(vocab, what="a JSON object of token -> id")
        names = [config[role] for role in ("bos", "eos", "pad", "unk")]
        named = {name: vocab_ids[name] for name in names if name in vocab_ids}
        kwargs = _parse(
            hf_bpe.read_vocab_merges, vocab, merges, {**named, **config["added"]},
            tokenizer_class=config["tokenizer_class"], model_type=config["model_type"],
        )
        return BPETokenizer, {**kwargs, **config_special}
    if model_file and model_file.is_file():
        if _is_tiktoken_file(model_file):
            return BPETokenizer, {**read_tiktoken_file(model_file, config["added"] or None), **config_special}
        kwargs = {"path": model_file, "added_tokens": config["added"], **config_special}
        if sentencepiece_json:  # its added tokens, their flags and where it puts "▁"
            added, flags, special_ids = hf_bpe.read_added_tokens(sentencepiece_json)
            kwargs["added_tokens"] = {**config["added"], **added}
            kwargs["added_flags"] = {**config["added_flags"], **flags}
            kwargs["special_ids"] = sorted({*config["special_ids"], *special_ids})
            kwargs["prefix"] = hf_bpe.sentencepiece_prefix(sentencepiece_json, json_file)
        elif config["legacy"] is False:  # transformers' non-legacy Llama/Mistral tokenizer
            kwargs["prefix"] = "first"
        return SentencePieceTokenizer, kwargs
    raise ValueError(
        f"{path}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt or tokenizer.model)"
    )


def _parse(read: Callable[..., dict[str, Any]], path: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
    # A tokenizer file that is JSON but not of the expected shape (a list, a vocab that is not a
    # mapping, a merge that is not a pair) fails somewhere inside the reader: name the file.
    try:
        return read(path, *args, **kwargs)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a tokenizer file this can read ({type(e).__name__}: {e})") from None


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).strip()
    return bool(_TIKTOKEN_LINE.match(first))


def _read_config(directory: Path) -> dict[str, Any]:
    """Special-token names, added tokens, chat template and generation eos ids beside a tokenizer."""
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    gen_cfg = _read_json(directory / "generation_config.json")
    out: dict[str, Any] = {}
    for role in ("bos", "eos", "pad", "unk"):
        value = tok_cfg.get(f"{role}_token", special_map.get(f"{role}_token"))
        out[role] = value.get("content") if isinstance(value, dict) else value
    added = tok_cfg.get("added_tokens_decoder", {})
    out["added"] = {v["content"]: int(k) for k, v in added.items()}
    out["added_flags"] = flags_of(added.values())
    out["special_ids"] = [int(k) for k, v in added.items() if v.get("special", True)]
    out["legacy"] = tok_cfg.get("legacy")
    out["tokenizer_class"] = tok_cfg.get("tokenizer_class")
    out["model_type"] = _read_json(directory / "config.json").get("model_type")
    eos_ids = gen_cfg.get("eos_token_id")
    out["eos_ids"] = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    out["pad_token_id"] = gen_cfg.get("pad_token_id")

    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"  # newer transformers save it beside the config
    if jinja_file.is_file():
        check_text_file(jinja_file)
        out["chat_template"], out["chat_template_origin"] = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    else:
        out["chat_template"], out["chat_template_origin"] = template, f"{directory / 'tokenizer_config.json'}"
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


# config.json `model_type` -> the named template of that family. Gemma-2's own template rejects
# a system message; Gemma-3's (named "gemma") folds it into the first user turn and is
# otherwise the same, so every Gemma gets it.
_FAMILY_TEMPLATES = {
    "qwen2": "qwen2_5",
    "qwen2_moe": "qwen2_5",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "phi3": "phi3",
}


def _default_template(added: dict[str, int], model_type: str | None) -> str | None:
    """The named template for a tokenizer without one: by model type, else by special tokens."""
    if model_type == "mistral" or (model_type is None and "[INST]" in added):
        # v3+ vocabularies have [INST] as a control token; v1's writes it as text.
        return "mistral_v3" if "[INST]" in added else "mistral"
    if model_type in _FAMILY_TEMPLATES:
        return _FAMILY_TEMPLATES[model_type]
    if "<|im_start|>" in added and "<|im_end|>" in added:
        return "chatml"
    if "<|start_header_id|>" in added and "<|eot_id|>" in added:
        return "llama3"
    if "<start_of_turn>" in added and "<end_of_turn>" in added:
        return "gemma"
    if all(t in added for t in ("<|user|>", "<|assistant|>", "<|end|>")):
        return "phi3"
    return None
