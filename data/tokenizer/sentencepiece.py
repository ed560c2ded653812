"""SentencePiece models (Llama-2, Mistral `tokenizer.model`) behind the `Tokenizer` protocol.

Control tokens (`<s>`, `</s>`, `<unk>`) and added tokens written in the text are encoded as
their ids, like HF tokenizers do; the text between them is encoded by SentencePiece piece by
piece, each piece getting SentencePiece's dummy-prefix space. That is what Mistral's reference
tokenizer and the (legacy) HF `tokenizer.json` of Llama-2/Mistral do, so `[INST]` after `<s>`
is `▁[INST]`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from tunewright.data.tokenizer import chat

if TYPE_CHECKING:
    from tunewright.data.tokenizer.base import Message


class SentencePieceTokenizer:
    """`path` is a SentencePiece model file. bos/eos come from the model unless given; pad is
    the model's pad, else its unk, else 0 (padding is never trained on, any id works)."""

    def __init__(
        self,
        path: str | Path,
        *,
        added_tokens: Mapping[str, int] | None = None,
        special_ids: Iterable[int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        stop_ids: Iterable[int] = (),
        chat_format: chat.ChatFormat | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        sp = self._sp
        num_pieces = sp.get_piece_size()
        controls = {sp.id_to_piece(i): i for i in range(num_pieces) if sp.is_control(i) or sp.is_unknown(i)}
        self.added_tokens = {**controls, **(added_tokens or {})}
        self.special_ids = frozenset(self.added_tokens.values() if special_ids is None else special_ids)
        self._id_to_added = {i: t for t, i in self.added_tokens.items()}
        # Longest first, so that of two added tokens sharing a prefix the longer one wins.
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        # Whether SentencePiece prepends "▁" to every piece it encodes (add_dummy_prefix).
        self._dummy_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("▁")
        self.vocab_size = max(num_pieces, max(self.added_tokens.values(), default=0) + 1)

        self.bos_id = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
        self.eos_id = eos_id if eos_id is not None else sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: the SentencePiece model has no eos token; pass eos_id")
        if pad_id is None:
            pad_id = next((i for i in (sp.pad_id(), sp.unk_id()) if i >= 0), 0)
        self.pad_id = pad_id
        self.chat_format = chat_format
        eot = chat_format.end_of_turn_ids(self.added_tokens) if chat_format else ()
        self.stop_ids = frozenset({self.eos_id, *stop_ids, *eot})
        self.max_seq_len = max_seq_len

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [i for piece in self._pieces(text) for i in self._encode_piece(piece)]
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        out, run = [], []
        for i in ids:
            if i in self._id_to_added:
                out.append(self._sp.decode(run))
                run = []
                if not (skip_special and i in self.special_ids):
                    out.append(self._id_to_added[i])
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def tokenize_messages(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        return chat.tokenize_messages(self, messages, add_generation_prompt=add_generation_prompt)

    # -- used by chat.py ---------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        return text  # SentencePiece normalises inside and reports nothing to map back

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        start = 0
        for piece in self._pieces(text):
            piece_ids = self._encode_piece(piece)
            ids += piece_ids
            spans += [(start + s, start + e) for s, e in self._piece_spans(piece, piece_ids)]
            start += len(piece)
        return ids, spans

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_tokens:
            return self.added_tokens[token]
        id_ = self._sp.piece_to_id(token)
        return None if id_ == self._sp.unk_id() and token != self._sp.id_to_piece(id_) else id_

    def id_to_token(self, id_: int) -> str:
        return self._id_to_added.get(id_) or self._sp.id_to_piece(id_)

    def _pieces(self, text: str) -> list[str]:
        """`text` cut into added tokens and the plain text between them."""
        parts = self._split.split(text) if self._split else [text]
        return [p for p in parts if p]

    def _encode_piece(self, piece: str) -> list[int]:
        if piece in self.added_tokens:
            return [self.added_tokens[piece]]
        return self._sp.encode(piece)

    def _piece_spans(self, piece: str, ids: list[int]) -> list[tuple[int, int]]:
        if piece in self.added_tokens:
            return [(0, len(piece))]
        token_bytes = [self._token_bytes(i) for i in ids]
        surface = b"".join(token_bytes)
        prefix = " " if self._dummy_prefix else ""
        if surface == (prefix + piece).encode():
            spans = chat.char_spans(prefix + piece, [len(b) for b in token_bytes])
            # The dummy-prefix space is not in the text: a token of it alone covers the first
            # character, so it is trained on exactly when the text after it is.
            return [(max(s - len(prefix), 0), max(e - len(prefix), 1)) for s, e in spans]
        # The model normalises (NFKC, squeezed spaces): fall back to decoding prefixes.
        starts = [len(self._sp.decode(ids[:k])) for k in range(len(ids))] + [len(piece)]
        starts = [min(s, len(piece)) for s in starts]
        return [(starts[k], max(starts[k + 1], starts[k])) for k in range(len(ids))]

    def _token_bytes(self, id_: int) -> bytes:
        piece = self._sp.id_to_piece(id_)
        if self._sp.is_byte(id_):  # byte fallback, written "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        if self._sp.is_control(id_) or self._sp.is_unknown(id_):
            return b""
        return piece.replace("▁", " ").encode()
