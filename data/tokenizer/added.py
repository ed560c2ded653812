"""Added tokens (`<|im_start|>`, `[INST]`, `<|end|>`) found in text the way HF `tokenizers` finds them.

Both engines cut the text at added tokens first and encode only the plain text between them,
as `tokenizers`' AddedVocabulary does: leftmost-longest matches, and per token the flags of
`tokenizer.json` / `added_tokens_decoder`:
- `lstrip` / `rstrip`: the whitespace left / right of the token belongs to it (Phi-3's
  `<|user|>` and `<|end|>` swallow the newline after them, so it is never encoded);
- `single_word`: only a match not touching a word character counts.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

# Unicode White_Space, what Rust's `\s` means in `tokenizers` (Python's `\s` adds \x1c-\x1f).
_WS = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)
}
_WORD = re.compile(r"\w")
FLAGS = ("lstrip", "rstrip", "single_word")
# Marks whitespace an lstrip/rstrip token swallows: it gives no id, and no token spans it (so a
# reply's leading spaces eaten by Phi-3's `<|assistant|>` do not make that token "trained on").
STRIPPED = -1


class AddedTokens:
    """`tokens`: text -> id; `flags`: text -> {"lstrip": bool, "rstrip": bool, "single_word": bool}."""

    def __init__(self, tokens: Mapping[str, int], flags: Mapping[str, Mapping[str, bool]] | None = None) -> None:
        self.tokens = dict(tokens)
        self.flags = {t: {k: bool(v.get(k)) for k in FLAGS} for t, v in (flags or {}).items() if t in self.tokens}
        # Longest first: at one position the longest token wins, as with leftmost-longest matching.
        names = sorted(self.tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def split(self, text: str) -> list[tuple[int, int, int | None]]:
        """`text` cut into consecutive (start, end, id) pieces; id is None for plain text and
        `STRIPPED` for whitespace that an lstrip/rstrip token takes."""
        if self._pattern is None or not text:
            return [(0, len(text), None)] if text else []
        pieces: list[tuple[int, int, int | None]] = []
        done = 0  # end of the last piece taken
        for match in self._pattern.finditer(text):
            start, stop = match.span()
            core_start, core_stop = start, stop
            flags = self.flags.get(match.group())
            if flags:
                if flags["single_word"] and (
                    (start > 0 and _WORD.match(text[start - 1])) or (stop < len(text) and _WORD.match(text[stop]))
                ):
                    continue
                # Whitespace an earlier token already took stays with it.
                while flags["lstrip"] and start > done and text[start - 1] in _WS:
                    start -= 1
                while flags["rstrip"] and stop < len(text) and text[stop] in _WS:
                    stop += 1
            if done < start:
                pieces.append((done, start, None))
            if start < core_start:
                pieces.append((start, core_start, STRIPPED))
            pieces.append((core_start, core_stop, self.tokens[match.group()]))
            if core_stop < stop:
                pieces.append((core_stop, stop, STRIPPED))
            done = stop
        if done < len(text):
            pieces.append((done, len(text), None))
        return pieces

    def __contains__(self, token: str) -> bool:
        return token in self.tokens


def flags_of(entries: Iterable[Mapping]) -> dict[str, dict[str, bool]]:
    """The strip flags of `tokenizer.json` `added_tokens` / `added_tokens_decoder` values that set any."""
    return {e["content"]: {k: bool(e.get(k)) for k in FLAGS} for e in entries if any(e.get(k) for k in FLAGS)}
