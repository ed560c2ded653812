"""Chat formatting: render a conversation with a Jinja chat template and mark what is trained on.

Rendering copies transformers' `apply_chat_template` (same sandboxed Jinja environment and
globals), and the ids are those of the whole rendered string tokenized in one go, so they equal
`apply_chat_template(messages, tokenize=True)`, runs of spaces under a SentencePiece-style
tokenizer.json that splits them aside (see `sentencepiece.py`). Families without a template of
their own use one of `NAMED_TEMPLATES`, written as the Jinja templates those families publish.

The mask is True on each token that overlaps an assistant turn: the reply and its end-of-turn
marker, as `return_assistant_tokens_mask` gives for `{% generation %}` blocks around them.
Templates with such blocks are trusted; for the others `turns.py` carries marks through the
template to find each turn, never searching the text for the reply. One difference from
transformers is deliberate: whitespace an rstrip token swallows (Phi-3's `<|assistant|>` takes
a reply's leading newlines) belongs to no token here, so that header is never trained on.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence

from tunewright.data.tokenizer.turns import turn_spans

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


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or fails on a conversation; names where it came from."""


class ChatFormat:
    """A Jinja chat template plus the variables it reads (`bos_token`, `eos_token`, ...).

    `template` is Jinja source or a name in `NAMED_TEMPLATES`; `origin` says where it came from
    (a file, a named template) in errors. A template that does not parse fails here, one that
    raises on a conversation fails when that conversation is rendered: `ChatTemplateError`.
    """

    def __init__(self, template: str, *, template_vars: Mapping[str, Any] | None = None,
                 origin: str | None = None) -> None:
        if template in NAMED_TEMPLATES:
            origin = origin or f"named template {template!r}"
            template = NAMED_TEMPLATES[template]
        elif "{{" not in template and "{%" not in template:
            raise ValueError(f"unknown chat template {template!r}; named ones: {sorted(NAMED_TEMPLATES)}")
        self.template = template
        self.template_vars = dict(template_vars or {})
        self.origin = origin or "the given chat template"
        _compile_checked(template, self.origin)

    def end_of_turn_ids(self, vocab: Mapping[str, int]) -> list[int]:
        """Ids of known end-of-turn tokens this template writes; generation stops at them."""
        return [vocab[t] for t in END_OF_TURN_TOKENS if t in self.template and t in vocab]

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        template = _compile(self.template)
        with self._failures():
            return template.render(**self._arguments(_as_transformers_passes(messages), add_generation_prompt))

    def render_with_spans(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        with self._failures():
            return self._render_with_spans(messages, add_generation_prompt)

    @contextmanager
    def _failures(self) -> Iterator[None]:
        # What a template raises (raise_exception, an undefined name, a type error in its code)
        # is about the template or the conversation: one line saying which template.
        import jinja2

        try:
            yield
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError,
                ZeroDivisionError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            if isinstance(e, jinja2.UndefinedError):  # e.g. `bos_token + ...` with no bos token
                message += " (neither the conversation nor the tokenizer's files define it)"
            raise ChatTemplateError(f"chat template ({self.origin}) failed on this conversation: "
                                    f"{message}") from None

    def _render_with_spans(
        self, messages: Sequence[Message], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        template = _compile(self.template)
        messages = _as_transformers_passes(messages)
        kwargs = self._arguments(messages, add_generation_prompt)
        if _GENERATION_TAG.search(self.template):
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            token = _TRACKING.set((blocks, spans))
            try:
                blocks.extend(template.generate(**kwargs))
            finally:
                _TRACKING.reset(token)
            return "".join(blocks), spans
        text = template.render(**kwargs)
        spans = turn_spans(lambda m, prompt: template.render(**self._arguments(m, prompt)), messages, text,
                           self._markers(), add_generation_prompt=add_generation_prompt)
        return text, spans

    def _markers(self) -> list[str]:
        """The end-of-turn markers this template writes (its eos_token among them)."""
        markers = [t for t in END_OF_TURN_TOKENS if t in self.template]
        return markers + ([self.template_vars["eos_token"]] if self.template_vars.get("eos_token") else [])

    def _arguments(self, messages: list[dict], add_generation_prompt: bool) -> dict[str, Any]:
        # As transformers: tools/documents are passed as None, then the tokenizer's variables.
        return {"tools": None, "documents": None, **self.template_vars,
                "messages": messages, "add_generation_prompt": add_generation_prompt}


def _as_transformers_passes(messages: Sequence[Message]) -> list[dict]:
    # As transformers: keys set to None are dropped.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


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


# -- the Jinja environment, as transformers builds it ----------------------------------------


def _compile_checked(template: str, origin: str) -> None:
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template ({origin}) does not parse: line {e.lineno}: {e.message}") from None


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
