"""Where each assistant turn lies in a rendered chat, found with marks carried through the template.

Templates trim, move and drop text (Mistral v0.3 writes the system message into the last user
turn, Phi-3 ends the conversation with eos, Qwen3 drops earlier reasoning), so searching the
rendered text for a reply finds the wrong place ("a" inside the user's "Say a") or none (an
empty reply). Instead every message's text is rendered between two private-use characters of
its own, put around its whitespace-stripped core so that a template's `trim` removes the same
whitespace as without them. Taken out again, the marks must leave exactly the plain rendering
(else the template did something to the text that cannot be followed, and we say so); where they
were is where each message's text is, with nothing searched for.

An assistant turn is what the model writes after the generation prompt, up to and including its
end-of-turn token, what transformers masks for a template whose `{% generation %}` blocks wrap
that. It runs
- from where the generation prompt ends: the conversation before the turn rendered with
  `add_generation_prompt=True` ends with some text after its last mark; where the full rendering
  has that same text after that mark, the turn starts after it (so Llama-2's and Mistral v0.3's
  space before the reply, SentencePiece's "▁", is the model's to write); otherwise at the reply;
- to the end of the first end-of-turn marker in the text the template writes after the reply
  with this turn: what follows the reply both in the conversation rendered up to this turn and in
  the whole one (so Phi-3's closing eos is not part of a turn). Without a marker there, to the end
  of that text less trailing whitespace.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

# Supplementary Private Use Area-A: characters no tokenizer or template gives a meaning.
_FIRST_MARK, _LAST_MARK = 0xF0000, 0xFFFFD
_MARK = re.compile(f"[{chr(_FIRST_MARK)}-{chr(_LAST_MARK)}]")

# render(messages, add_generation_prompt) -> text, the template with everything else bound.
Render = Callable[[list[dict], bool], str]


def turn_spans(
    render: Render, messages: list[dict], text: str, markers: Sequence[str], *, add_generation_prompt: bool
) -> list[tuple[int, int]]:
    """[start, end) character spans in `text` (`messages` rendered) of each assistant turn.

    `markers` are the end-of-turn strings the template writes (`<|im_end|>`, eos, ...).
    """
    if 2 * len(messages) > _LAST_MARK - _FIRST_MARK:
        raise ValueError(f"a conversation of {len(messages)} messages is too long to mark its replies")
    if any(_MARK.search(m["content"]) for m in messages if isinstance(m.get("content"), str)):
        raise ValueError("message text holds private-use characters U+F0000-U+FFFFD, which mark replies")
    # Marks next to an all-whitespace text can keep a template's strip() from removing it and the
    # whitespace around it (Llama-2 strips the system prompt joined to an empty user message). Such
    # texts are marked (after their whitespace) where that changes nothing, else only replies (after
    # or before), else none: an unmarked blank reply is where its turn starts.
    for blank_others, blank_replies in ((True, "after"), (False, "after"), (False, "before"), (False, None)):
        marked = _marked(messages, blank_others=blank_others, blank_replies=blank_replies)
        plain, where = _unmark(render(marked, add_generation_prompt))
        if plain == text:
            break
    else:
        raise ValueError(
            "the chat template changes message text in a way that hides which tokens are replies;"
            " wrap each reply and its end-of-turn token in {% generation %} ... {% endgeneration %}"
        )

    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _turn_start(render, marked, k, plain, where)
        content = marked[k].get("content")
        if isinstance(content, str) and _close(k) in content:
            close = where.get(_close(k))
        else:  # a blank reply left unmarked, or not text: it is where its turn starts
            close = start
        if close is None:
            raise ValueError(
                f"cannot tell where the chat template writes message {k} (assistant): it drops or repeats"
                " it; wrap each reply in {% generation %} ... {% endgeneration %}"
            )
        reply = where.get(_open(k))
        reply = close if reply is None else reply  # a template cutting the text may lose the first mark
        start = reply if start is None or start > reply else max(start, spans[-1][1] if spans else 0)
        spans.append((start, _turn_end(render, marked, k, plain, close, where, markers)))
    return spans


def _open(index: int) -> str:
    return chr(_FIRST_MARK + 2 * index)


def _close(index: int) -> str:
    return chr(_FIRST_MARK + 2 * index + 1)


def _marked(messages: list[dict], *, blank_others: bool, blank_replies: str | None) -> list[dict]:
    """`messages` with each text's core between its marks; all-whitespace texts get theirs
    `blank_replies` the whitespace (or none) for replies, after it for others if `blank_others`."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            core = content.strip()
            lead = len(content) - len(content.lstrip())
            place = blank_replies if message.get("role") == "assistant" else "after" if blank_others else None
            if core:
                content = content[:lead] + _open(i) + core + _close(i) + content[lead + len(core) :]
            elif place is not None:
                marks = _open(i) + _close(i)
                content = content + marks if place == "after" else marks + content
            message = {**message, "content": content}
        out.append(message)
    return out


def _unmark(marked: str) -> tuple[str, dict[str, int | None]]:
    """`marked` without its marks, and each mark's position in that text (None if it repeats)."""
    pieces: list[str] = []
    where: dict[str, int | None] = {}
    length = done = 0
    for match in _MARK.finditer(marked):
        pieces.append(marked[done : match.start()])
        length += match.start() - done
        done = match.end()
        where[match.group()] = None if match.group() in where else length
    pieces.append(marked[done:])
    return "".join(pieces), where


def _try_render(render: Render, messages: list[dict], add_generation_prompt: bool) -> str | None:
    try:
        return render(messages, add_generation_prompt)
    except Exception:  # a template may refuse a part of the conversation (e.g. no user turn yet)
        return None


def _turn_start(render: Render, marked: list[dict], k: int, plain: str, where: dict) -> int | None:
    before = _try_render(render, marked[:k], True)
    if before is None:
        return None
    # Anchored at the last mark that the full text also has (the prompt may hold text the full
    # conversation drops, as Mistral v0.3's system message), the text after it must be the same.
    for mark in reversed(_MARK.findall(before)):
        if where.get(mark) is not None:
            prompt = _MARK.sub("", before[before.rindex(mark) + 1 :])
            return where[mark] + len(prompt) if plain.startswith(prompt, where[mark]) else None
    before = _MARK.sub("", before)
    return len(before) if plain.startswith(before) else None


def _turn_end(
    render: Render, marked: list[dict], k: int, plain: str, close: int, where: dict, markers: Sequence[str]
) -> int:
    after = plain[close:]
    through = _try_render(render, marked[: k + 1], False)
    at = through.find(_close(k)) if through is not None else -1
    if at < 0:  # only the stretch up to a later message's text, and only a marker in it
        later = [p for mark, p in where.items() if mark > _close(k) and p is not None]
        own, bounded = after[: min(later, default=len(plain)) - close], False
    else:
        written = _MARK.sub("", through[at + 1 :])
        n = 0
        while n < min(len(written), len(after)) and written[n] == after[n]:
            n += 1
        own, bounded = after[:n], True
    found = [(i, -len(m)) for m in markers if (i := own.find(m)) >= 0]
    if found:
        i, minus_len = min(found)  # the first marker; of two at one place the longer
        return close + i - minus_len
    return close + len(own.rstrip()) if bounded else close
