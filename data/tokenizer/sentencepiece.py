"""SentencePiece models (Llama-2, Mistral `tokenizer.model`) behind the `Tokenizer` protocol.

Control tokens (`<s>`, `</s>`, `<unk>`, v3's `[INST]`) and added tokens written in the text are
encoded as their ids, like HF tokenizers do (see `added.py`, incl. lstrip/rstrip); the text
between them is encoded by SentencePiece piece by piece. Where the "▁" standing for a leading
space goes is `prefix`:
- "legacy": SentencePiece's dummy prefix on every piece, what `sentencepiece` itself, Mistral's
  v1 tokenizer and the legacy HF `tokenizer.json` of Llama-2/Mistral-v0.1 do, so `[INST]` after
  `<s>` is `▁[INST]`;
- "first" (HF `Metaspace(prepend_scheme="first")`, `legacy: false`, e.g. Mistral-v0.3): only on
  the text at the very start, so `[INST] hi` is `[INST]`, `▁hi`, what mistral-common gives;
- "always" / "never": every piece / none; these and "first" skip it when the text already
  starts with a space.

A run of spaces stays one piece to SentencePiece ("a   b" is ▁a ▁▁ ▁b), as mistral-common
encodes it. An HF `tokenizer.json` whose Metaspace pre-tokenizer splits at spaces (`split:
true`, also what a file without that key means) gives ▁a ▁ ▁ ▁b: with such a file our ids
follow SentencePiece, so they can differ from transformers' where the text holds two spaces in
a row.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from tunewright.data.tokenizer import chat
from tunewright.data.tokenizer.added import STRIPPED, AddedTokens

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
        added_flags: Mapping[str, Mapping[str, bool]] | None = None,
        special_ids: Iterable[int] | None = None,
        prefix: str = "legacy",
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
        self._added = AddedTokens(self.added_tokens, added_flags)
        if prefix not in ("legacy", "first", "always", "never"):
            raise ValueError(f"{path}: prefix must be legacy, first, always or never, not {prefix!r}")
        self.prefix = prefix
        # Whether SentencePiece prepends "▁" to every piece it encodes (add_dummy_prefix); the
        # same model without it encodes the pieces that get no "▁".
        self._dummy_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("▁")
        self._bare = sp
        if self._dummy_prefix and prefix != "legacy":
            proto = _without_dummy_prefix(sp.serialized_model_proto())
            self._bare = sentencepiece.SentencePieceProcessor(model_proto=proto)
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
        ids: list[int] = []
        for start, end, added_id in self._added.split(text):
            if added_id is None:
                ids += self._processor(text, start, end).encode(text[start:end])
            elif added_id != STRIPPED:
                ids.append(added_id)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        out, run = [], []
        for i in [*ids, None]:  # None flushes the last run
            if i is not None and i not in self._id_to_added:
                run.append(i)
                continue
            if run:
                # A run's leading "▁" is a dummy prefix where encode put one: at the start,
                # or after every added token in legacy/always mode.
                prefixed = not out or self.prefix in ("legacy", "always")
                out.append((self._sp if prefixed else self._bare).decode(run))
                run = []
            if i is not None and not (skip_special and i in self.special_ids):
                out.append(self._id_to_added[i])
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
        for start, end, added_id in self._added.split(text):
            if added_id == STRIPPED:
                continue
            if added_id is not None:
                ids.append(added_id)
                spans.append((start, end))
                continue
            processor = self._processor(text, start, end)
            piece_ids = processor.encode(text[start:end])
            ids += piece_ids
            # In legacy mode `_bare` is `_sp`: whether a "▁" was prepended is which model encoded.
            piece_spans = self._piece_spans(text[start:end], piece_ids, processor is self._sp)
            spans += [(start + s, start + e) for s, e in piece_spans]
        return ids, spans

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_tokens:
            return self.added_tokens[token]
        id_ = self._sp.piece_to_id(token)
        return None if id_ == self._sp.unk_id() and token != self._sp.id_to_piece(id_) else id_

    def id_to_token(self, id_: int) -> str:
        return self._id_to_added.get(id_) or self._sp.id_to_piece(id_)

    def _processor(self, text: str, start: int, end: int):
        """The SentencePiece processor for the plain text text[start:end]: with or without "▁"."""
        if self.prefix == "legacy":
            return self._sp
        starts_with_space = text.startswith((" ", "▁"), start, end)
        prefixed = self.prefix == "always" or (self.prefix == "first" and start == 0)
        return self._sp if prefixed and not starts_with_space else self._bare

    def _piece_spans(self, piece: str, ids: list[int], prefixed: bool) -> list[tuple[int, int]]:
        token_bytes = [self._token_bytes(i) for i in ids]
        surface = b"".join(token_bytes)
        prefix = " " if prefixed and self._dummy_prefix else ""
        if surface == (prefix + piece).encode():
            spans = chat.char_spans(prefix + piece, [len(b) for b in token_bytes])
            # The dummy-prefix space is not in the text: a token of it alone covers the first
            # character, so it is trained on exactly when the text after it is.
            return [(max(s - len(prefix), 0), max(e - len(prefix), 1)) for s, e in spans]
        # The model normalises (NFKC, squeezed spaces): fall back to decoding prefixes.
        processor = self._sp if prefixed else self._bare
        starts = [len(processor.decode(ids[:k])) for k in range(len(ids))] + [len(piece)]
        starts = [min(s, len(piece)) for s in starts]
        return [(starts[k], max(starts[k + 1], starts[k])) for k in range(len(ids))]

    def _token_bytes(self, id_: int) -> bytes:
        piece = self._sp.id_to_piece(id_)
        if self._sp.is_byte(id_):  # byte fallback, written "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        if self._sp.is_control(id_) or self._sp.is_unknown(id_):
            return b""
        return piece.replace("▁", " ").encode()


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """A serialized SentencePiece ModelProto with `normalizer_spec.add_dummy_prefix = false`.

    Edited on the wire (no protobuf dependency): ModelProto field 3 is the NormalizerSpec, whose
    field 3 is add_dummy_prefix; every other byte is kept.
    """
    out = bytearray()
    for number, wire_type, field, value in _fields(model_proto):
        if number == 3 and wire_type == 2:
            spec = b"".join(f for n, _, f, _ in _fields(value) if n != 3) + b"\x18\x00"
            out += b"\x1a" + _encode_varint(len(spec)) + spec
        else:
            out += field
    return bytes(out)


def _fields(message: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, the field's bytes, its payload) for each top-level field."""
    pos = 0
    while pos < len(message):
        start = pos
        tag, pos = _varint(message, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, end = _varint(message, pos)
        elif wire_type == 2:
            size, pos = _varint(message, pos)
            end = pos + size
        elif wire_type in (1, 5):
            end = pos + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unexpected wire type {wire_type} in a SentencePiece model")
        yield tag >> 3, wire_type, message[start:end], message[pos:end]
        pos = end


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
