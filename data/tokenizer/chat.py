"""Chat formatting: render a conversation with a Jinja chat template and mark what is trained on.

Rendering copies transformers' `apply_chat_template` (same sandboxed Jinja environment and
globals), and the ids are those of the whole rendered string tokenized in one go, so they equal
`apply_chat_template(messages, tokenize=True)`. Families without a template of their own use one
of `NAMED_TEMPLATES`, written as the Jinja templates those families publish.

The mask is True on each assistant message's content and its end-of-turn marker. Its character
span is found by rendering prefixes of the conversation: the text the template adds for message
k, minus the generation prompt, is that turn. Templates that say it themselves with
`{% generation %}` blocks are trusted instead; templates whose earlier turns change once later
ones exist (Qwen3 drops old reasoning) fall back to finding the content in the rendered text.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from tunewright.data.tokenizer.base import Message

# The chat templates of the model families, as their tokenizer_config.json publishes them (see
# templates/README.md for where each comes from). A tokenizer directory without a template of
# its own gets one of these by name (`load_tokenizer` picks it from the model type).
_TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED_TEMPLATES = {p.stem: p.read_text(encoding="utf-8") for p in sorted(_TEMPLATE_DIR.glob("*.jinja"))}
# Tokens that end a turn in the templates we know; those a template uses become stop ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class ChatEngine(Protocol):
    """What `tokenize_messages` needs from a tokenizer engine."""

    chat_format: ChatFormat | None
    max_seq_len: int | None

    def normalize(self, text: str) -> str: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


class ChatFormat:
    """A Jinja chat template plus the variables it reads (`bos_token`, `eos_token`, ...).

    `template` is Jinja source or a name in `NAMED_TEMPLATES`.
    """

    def __init__(self, template: str, *, template_vars: Mapping[str, Any] | None = None) -> None:
        if template in NAMED_TEMPLATES:
            template = NAMED_TEMPLATES[template]
        elif "{{" not in template and "{%" not in template:
            raise ValueError(f"unknown chat template {template!r}; named ones: {sorted(NAMED_TEMPLATES)}")
        self.template = template
        self.template_vars = dict(template_vars or {})

    def end_of_turn_ids(self, vocab: Mapping[str, int]) -> list[int]:
        """Ids of known end-of-turn tokens this template writes; generation stops at them."""
        return [vocab[t] for t in END_OF_TURN_TOKENS if t in self.template and t in vocab]

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        return self.render_with_spans(messages, add_generation_prompt=add_generation_prompt)[0]

    def render_with_spans(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        template = _compile(self.template)
        # As transformers: keys set to None are dropped, and tools/documents are passed as None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        kwargs = {"tools": None, "documents": None, **self.template_vars}
        kwargs["add_generation_prompt"] = add_generation_prompt
        if _GENERATION_TAG.search(self.template):
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            token = _TRACKING.set((blocks, spans))
            try:
                blocks.extend(template.generate(messages=messages, **kwargs))
            finally:
                _TRACKING.reset(token)
            return "".join(blocks), spans
        text = template.render(messages=messages, **kwargs)
        return text, self._prefix_spans(text, messages, kwargs)

    def _prefix_spans(self, text: str, messages: list[dict], kwargs: dict) -> list[tuple[int, int]]:
        template = _compile(self.template)

        def render(prefix: list[dict], prompt: bool) -> str:
            return template.render(**kwargs | {"messages": prefix, "add_generation_prompt": prompt})

        spans = []
        cursor = 0
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            try:
                before, through = render(messages[:k], True), render(messages[: k + 1], False)
                rendered = True
            except Exception:  # a template may refuse a prefix (e.g. one that must end with a user turn)
                before, through, rendered = "", "", False
            is_prefix = rendered and text.startswith(before) and text.startswith(through)
            if is_prefix and len(through) > len(before):
                start, end = len(before), len(through)
                end = self._cut_after_marker(text, message, start, end)
            else:
                start, end = self._find_content(text, message, max(cursor, _common_prefix(before, text)))
            # Whitespace after the end-of-turn marker only separates turns: not trained on.
            end = start + len(text[start:end].rstrip())
            spans.append((start, end))
            cursor = end
        return spans

    def _find_content(self, text: str, message: dict, cursor: int) -> tuple[int, int]:
        content = str(message.get("content") or "").strip()
        start = text.find(content, cursor)
        if not content or start < 0:
            raise ValueError("chat template rewrites assistant content; cannot tell which tokens to train on")
        end = start + len(content)
        for marker in self._markers():
            if text.startswith(marker, end):
                end += len(marker)
                break
        return start, end

    def _markers(self) -> list[str]:
        """The end-of-turn markers this template writes (its eos_token among them)."""
        markers = [t for t in END_OF_TURN_TOKENS if t in self.template]
        return markers + ([self.template_vars["eos_token"]] if self.template_vars.get("eos_token") else [])

    def _cut_after_marker(self, text: str, message: dict, start: int, end: int) -> int:
        """End an assistant turn at its first end-of-turn marker after the content.

        What a template adds with the last turn can go past it: Phi-3 ends the conversation
        with eos after `<|end|>`, which is not part of the reply.
        """
        content = str(message.get("content") or "").strip()
        at = text.find(content, start, end) if content else -1
        after = at + len(content) if at >= 0 else start
        found = [(text.find(m, after, end), m) for m in self._markers()]
        found = [(pos, m) for pos, m in found if pos >= 0]
        if not found:
            return end
        pos, marker = min(found)
        return pos + len(marker)


def tokenize_messages(
    engine: ChatEngine, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Ids of the rendered conversation (as one string) and, per id, whether it is trained on.

    A token is trained on if any of its characters lies in an assistant span, the rule
    transformers uses for `return_assistant_tokens_mask`. With `engine.max_seq_len`, both lists
    are cut to that length.
    """
    if engine.chat_format is None:
        raise ValueError("this tokenizer has no chat template; pass chat_template= (Jinja or a named one)")
    text, spans = engine.chat_format.render_with_spans(messages, add_generation_prompt=add_generation_prompt)
    normalized = engine.normalize(text)
    if normalized != text:  # move span ends to where they fall in the normalised text
        spans = [(len(engine.normalize(text[:s])), len(engine.normalize(text[:e]))) for s, e in spans]
    ids, offsets = engine.encode_with_offsets(normalized)
    mask = [False] * len(ids)
    span_index = 0
    for i, (tok_start, tok_end) in enumerate(offsets):  # both in order: one pass
        while span_index < len(spans) and tok_start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        mask[i] = tok_end > spans[span_index][0]
    if engine.max_seq_len is not None:
        ids, mask = ids[: engine.max_seq_len], mask[: engine.max_seq_len]
    return ids, mask


def char_spans(text: str, byte_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) character spans of consecutive tokens, given each one's UTF-8 byte length.

    A token holding part of a multi-byte character spans that whole character.
    """
    if text.isascii():
        char_of_byte = list(range(len(text) + 1))
    else:
        widths = (len(ch.encode("utf-8", "surrogatepass")) for ch in text)
        char_of_byte = [i for i, width in enumerate(widths) for _ in range(width)]
        char_of_byte.append(len(text))
    assert sum(byte_lengths) == len(char_of_byte) - 1, "token bytes do not add up to the text"
    spans, pos = [], 0
    for length in byte_lengths:
        end = pos + length
        spans.append((char_of_byte[pos], char_of_byte[end - 1] + 1 if length else char_of_byte[pos]))
        pos = end
    return spans


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- the Jinja environment, as transformers builds it ----------------------------------------

_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("tracking", default=None)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where assistant text was rendered."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller) -> str:
            rendered = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rendered)))
            return rendered

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
