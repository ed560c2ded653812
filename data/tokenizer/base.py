"""The one tokenizer interface every engine (byte-level BPE, SentencePiece) implements.

Datasets, generation and recipes see only this protocol, so a family can bring any engine.
"""

from __future__ import annotations

from typing import Annotated, Protocol, Sequence, TypedDict

from tunewright.training.schema import Range

IGNORE_INDEX = -100  # label value that cross-entropy skips
# A sequence length in tokens (`max_seq_len`): the config schema checks the range, naming the key.
TokenCount = Annotated[int, Range(ge=2, hint="a row needs a token and the next one to predict")]


class Message(TypedDict, total=False):
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    # Ids that end a generation (eos plus e.g. <|eot_id|>, <|im_end|>).
    stop_ids: frozenset[int]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def tokenize_messages(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the chat-formatted conversation and, per id, whether it is trained on
        (True for assistant turns: their content and end-of-turn marker)."""
        ...
