"""Byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2) on top of tiktoken's Rust encoder.

Every source format (tiktoken ranks file, HF `tokenizer.json`, `vocab.json` + `merges.txt`) is
reduced to the same three things: mergeable token bytes -> rank, one pre-tokenizer regex, and
added tokens. HF files are converted in `hf_bpe.py`.

Added tokens written in the text (`<|im_start|>`, `<|eot_id|>`) are encoded as their single id,
as HF `tokenizers` does (see `added.py`, incl. lstrip/rstrip), so ids equal
`apply_chat_template(tokenize=True)`. The flip side is that a dataset containing such strings
gets real control tokens; clean data that may hold them.
"""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from tunewright.data.tokenizer import chat
from tunewright.data.tokenizer.added import STRIPPED, AddedTokens

if TYPE_CHECKING:
    from tunewright.data.tokenizer.base import Message

# Meta's Llama-3 split regex (also Llama-3.1/3.2 and, with \p{N} for \p{N}{1,3}, Qwen2/3).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers' Qwen2Tokenizer (Qwen2/2.5/3) regex: Llama-3's with single digits.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# GPT-2's regex: what an HF `ByteLevel(use_regex=True)` pre-tokenizer applies.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Names of end-of-generation tokens we know across families.
_EOS_GUESSES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|im_end|>", "<eos>")


def llama3_special_tokens(num_reserved: int = 256) -> list[str]:
    """Llama-3's special tokens in id order, starting at id 128000 (after the 128,000 ranks).

    The HF files of Llama-3.1+ rename some reserved slots (`<|eom_id|>` at 128008); a
    `tokenizer_config.json` next to the ranks file overrides these names.
    """
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, num_reserved - 5)]
    return named + reserved


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one `base64(token) rank` per line (Llama-3's `tokenizer.model`)."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}: line {line_no} is not `base64-token rank`") from e
    return ranks


def read_tiktoken_file(
    path: str | Path,
    special_tokens: Sequence[str] | Mapping[str, int] | None = None,
    *,
    pattern: str = LLAMA3_PATTERN,
) -> dict[str, Any]:
    """Keyword arguments of `BPETokenizer` for a tiktoken ranks file plus special tokens.

    The defaults are Llama-3's pattern and special tokens. A list of special tokens is numbered
    from the number of ranks, as Meta's code does.
    """
    ranks = read_tiktoken_ranks(path)
    if special_tokens is None:
        special_tokens = llama3_special_tokens()
    if not isinstance(special_tokens, Mapping):
        special_tokens = {t: len(ranks) + i for i, t in enumerate(special_tokens)}
    kwargs: dict[str, Any] = {"ranks": ranks, "pattern": pattern, "added_tokens": dict(special_tokens)}
    for role, name in (("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>")):
        if name in special_tokens:
            kwargs[f"{role}_id"] = special_tokens[name]
    return kwargs


class BPETokenizer:
    """A byte-level BPE `Tokenizer`.

    `ranks` maps each mergeable token's bytes to its rank: the pair whose concatenation has the
    lowest rank merges first. Normally rank == id; when a file's ids do not follow merge order,
    `ids[rank]` gives the id. `added_tokens` are recognised in text before the regex runs;
    those in `special_ids` (default: all) are dropped by `decode(skip_special=True)`.
    """

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        pattern: str,
        added_tokens: Mapping[str, int] | None = None,
        *,
        ids: Sequence[int] | None = None,
        added_flags: Mapping[str, Mapping[str, bool]] | None = None,
        special_ids: Iterable[int] | None = None,
        decode_only: Mapping[int, bytes] | None = None,
        normalization: str | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        stop_ids: Iterable[int] = (),
        chat_format: chat.ChatFormat | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        import tiktoken

        added = dict(added_tokens or {})
        # tiktoken needs a rank for every byte, while HF drops the bytes a vocabulary lacks
        # (SmolLM2 has no token for 21 bytes, most of which never occur in UTF-8): give those
        # placeholder ranks after everything else and drop their tokens from the output.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        if ids is None:
            first_free = max([*ranks.values(), *added.values()]) + 1
            placeholders = {b: first_free + i for i, b in enumerate(missing)}
            self._id_of: list[int] | None = None
        else:
            # tiktoken returns ranks: map every rank back to its id after encoding.
            placeholders = {b: len(ids) + i for i, b in enumerate(missing)}
            self._id_of = [*ids, *[-1] * len(missing)]
        self._dropped = frozenset(placeholders.values())
        # Added tokens are cut out before tiktoken sees the text (`AddedTokens`), so tiktoken
        # only ever encodes plain text.
        self._encoding = tiktoken.Encoding(
            name="tunewright-bpe", pat_str=pattern, mergeable_ranks={**ranks, **placeholders}, special_tokens={}
        )
        self._added = AddedTokens(added, added_flags)
        # id -> bytes for decode; `decode_only` holds vocabulary entries no merge can produce.
        self._bytes: dict[int, bytes] = dict(decode_only or {})
        for token, rank in ranks.items():
            self._bytes[rank if ids is None else ids[rank]] = token
        for text, id_ in added.items():
            self._bytes[id_] = text.encode()
        self.added_tokens = added
        self.special_ids = frozenset(added.values() if special_ids is None else special_ids)
        self.normalization = normalization
        self.vocab_size = max(self._bytes) + 1

        if eos_id is None:
            eos_id = next((added[t] for t in _EOS_GUESSES if t in added), None)
            if eos_id is None:
                raise ValueError("no eos token given and none of the usual names is in the vocabulary")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat_format = chat_format
        eot = chat_format.end_of_turn_ids(added) if chat_format else ()
        self.stop_ids = frozenset({eos_id, *stop_ids, *eot})
        self.max_seq_len = max_seq_len

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | Path,
        *,
        pattern: str = LLAMA3_PATTERN,
        special_tokens: Sequence[str] | Mapping[str, int] | None = None,
        **kwargs,
    ) -> BPETokenizer:
        """A tiktoken ranks file (see `read_tiktoken_file`); `kwargs` override what it implies."""
        return cls(**{**read_tiktoken_file(path, special_tokens, pattern=pattern), **kwargs})

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kwargs) -> BPETokenizer:
        """An HF `tokenizer.json` of a byte-level BPE model (see `hf_bpe.read_tokenizer_json`)."""
        from tunewright.data.tokenizer.hf_bpe import read_tokenizer_json

        return cls(**read_tokenizer_json(path), **kwargs)

    @classmethod
    def from_vocab_merges(
        cls, vocab_path: str | Path, merges_path: str | Path, *, tokenizer_class: str | None = None, **kwargs
    ) -> BPETokenizer:
        """`vocab.json` + `merges.txt`, split as `tokenizer_class` does (see `hf_bpe.read_vocab_merges`)."""
        from tunewright.data.tokenizer.hf_bpe import read_vocab_merges

        return cls(**read_vocab_merges(vocab_path, merges_path, tokenizer_class=tokenizer_class), **kwargs)

    # -- Tokenizer protocol ------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        text = self.normalize(text)
        ids: list[int] = []
        for start, end, added_id in self._added.split(text):
            if added_id is not None:
                ids += [] if added_id == STRIPPED else [added_id]
                continue
            values = self._encoding.encode_ordinary(text[start:end])
            if self._dropped:
                values = [v for v in values if v not in self._dropped]
            ids += values if self._id_of is None else [self._id_of[v] for v in values]
        if add_bos and self.bos_id is not None:  # models without one (Qwen) start bare
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        # Joined first: one character's bytes may be split across tokens.
        try:
            return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary") from None

    def tokenize_messages(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        return chat.tokenize_messages(self, messages, add_generation_prompt=add_generation_prompt)

    # -- used by chat.py ---------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """The Unicode normalisation the file asks for (Qwen: NFC), applied before encoding."""
        return unicodedata.normalize(self.normalization, text) if self.normalization else text

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of already-normalised `text` and each token's [start, end) character span.

        A token holding part of a multi-byte character spans that whole character.
        """
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for start, end, added_id in self._added.split(text):
            if added_id == STRIPPED:
                continue
            if added_id is not None:
                ids.append(added_id)
                spans.append((start, end))
                continue
            piece = text[start:end]
            values = self._encoding.encode_ordinary(piece)
            # A dropped byte (see __init__) still takes up its byte of the text.
            lengths = [1 if v in self._dropped else len(self._bytes[self._to_id(v)]) for v in values]
            piece_spans = chat.char_spans(piece, lengths)
            for value, (s, e) in zip(values, piece_spans):
                if value not in self._dropped:
                    ids.append(self._to_id(value))
                    spans.append((start + s, start + e))
        return ids, spans

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token, for chat templates' `bos_token`/`eos_token` names."""
        return self.added_tokens.get(token)

    def id_to_token(self, id_: int) -> str:
        return self._bytes[id_].decode("utf-8", errors="replace")

    def _to_id(self, value: int) -> int:
        """The id of what tiktoken returned (a rank, or an added token's number)."""
        return value if self._id_of is None else self._id_of[value]

