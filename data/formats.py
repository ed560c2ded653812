"""Row formats: turn one dataset row into chat messages (or plain text) before tokenization.

- ``instruct``: Alpaca columns ``instruction`` / ``input`` (optional) / ``output``. The user
  turn is the Alpaca prompt text, the assistant turn the output; the tokenizer's chat format
  then wraps both, so an instruct row trains exactly like a one-turn chat.
- ``chat``: a ``messages`` column of ``{role, content}`` dicts, or ShareGPT ``conversations``
  of ``{from, value}`` dicts (``human``/``gpt`` roles).
- ``text``: a ``text`` column for plain completion; every token is trained on.

`column_map` maps our field name to the dataset's column, e.g.
``{"instruction": "prompt", "output": "answer"}``; for chat rows it may also rename the keys
inside each message (``{"role": "speaker", "content": "text"}``).
A malformed row raises `DataError`; `SFTDataset` prefixes it with the source and row index.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence, Union

from tunewright.data.tokenizer.base import Message

Format = Literal["instruct", "chat", "text"]
FORMATS: tuple[str, ...] = ("instruct", "chat", "text")
ROLES = frozenset({"system", "user", "assistant", "tool"})
# ShareGPT speaker names; our own role names are accepted there too.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
SHAREGPT_ROLES.update({role: role for role in ROLES})

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# What a converter returns: messages for the chat format, or a string for plain text.
Converted = Union[list[Message], str]
Converter = Callable[[Mapping[str, Any]], Converted]


class DataError(ValueError):
    """A dataset row that cannot be used; the message says which row and which field."""


def make_converter(
    format: Format,
    *,
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> Converter:
    """A function row -> messages (``instruct``, ``chat``) or text (``text``)."""
    columns = dict(column_map or {})
    if format == "instruct":
        _check_keys(format, columns, {"instruction", "input", "output"})
        return lambda row: instruct_messages(row, column_map=columns, system_prompt=system_prompt)
    if format == "chat":
        _check_keys(format, columns, {"messages", "conversations", "role", "content"})
        return lambda row: chat_messages(row, column_map=columns, system_prompt=system_prompt)
    if format == "text":
        _check_keys(format, columns, {"text"})
        if system_prompt is not None:
            raise ValueError("system_prompt does not apply to format 'text' (plain completion)")
        return lambda row: _string_field(row, columns.get("text", "text"))
    raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")


def check_columns(
    format: Format, columns: Sequence[str], *, column_map: Mapping[str, str] | None = None, source: str
) -> None:
    """DataError naming `source`, the columns it has and `column_map` when a column `format`
    needs is absent (a row that only leaves a cell empty is reported by its converter)."""
    mapped = dict(column_map or {})
    needed = {"instruct": [("instruction",), ("output",)], "chat": [("messages", "conversations")],
              "text": [("text",)]}[format]
    for alternatives in needed:
        names = [mapped.get(field, field) for field in alternatives]
        if any(name in columns for name in names):
            continue
        wanted = " or ".join(repr(n) for n in names)
        example = ", ".join(f"{field}: <your column>" for field in alternatives[:1])
        raise DataError(f"{source}: format {format!r} needs a column {wanted}; the columns are "
                        f"{', '.join(columns) or 'none'} (map yours with dataset.column_map, "
                        f"e.g. column_map: {{{example}}})")


def instruct_messages(
    row: Mapping[str, Any],
    *,
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> list[Message]:
    """An Alpaca row as [system?, user: Alpaca prompt, assistant: output]."""
    columns = column_map or {}
    instruction = _string_field(row, columns.get("instruction", "instruction"))
    output = _string_field(row, columns.get("output", "output"))
    input_column = columns.get("input", "input")
    # `input` is optional: many instruct sets have no such column, and Alpaca leaves it empty.
    input_text = row.get(input_column)
    if input_text is None:
        input_text = ""
    elif not isinstance(input_text, str):
        raise DataError(_type_problem(input_column, input_text))
    if input_text:
        prompt = PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=instruction)
    messages: list[Message] = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output},
    ]
    return _with_system(messages, system_prompt)


def chat_messages(
    row: Mapping[str, Any],
    *,
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> list[Message]:
    """A ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) row."""
    columns = column_map or {}
    messages_column = columns.get("messages", "messages")
    sharegpt_column = columns.get("conversations", "conversations")
    if row.get(messages_column) is not None:
        column, turns, roles = messages_column, row[messages_column], {r: r for r in ROLES}
        role_key, content_key = columns.get("role", "role"), columns.get("content", "content")
    elif row.get(sharegpt_column) is not None:
        column, turns, roles = sharegpt_column, row[sharegpt_column], SHAREGPT_ROLES
        role_key, content_key = columns.get("role", "from"), columns.get("content", "value")
    else:
        raise DataError(f"missing field '{messages_column}' (or '{sharegpt_column}')")
    if not isinstance(turns, list):
        raise DataError(_type_problem(column, turns, "a list of messages"))
    if not turns:
        raise DataError(f"field '{column}' is an empty conversation")

    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, Mapping):
            raise DataError(_type_problem(where, turn, "a dict"))
        role = _string_field(turn, role_key, where=where)
        if role not in roles:
            expected = ", ".join(sorted(roles))
            raise DataError(f"field '{where}.{role_key}' has unknown role {role!r} ({expected})")
        content = _string_field(turn, content_key, where=where)
        messages.append({"role": roles[role], "content": content})
    return _with_system(messages, system_prompt)


def _with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    # A configured system prompt replaces the row's own, so every sample sees the same one.
    if system_prompt is None:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system_prompt}, *rest]


def _string_field(row: Mapping[str, Any], key: str, *, where: str | None = None) -> str:
    name = f"{where}.{key}" if where else key
    if key not in row or row[key] is None:  # csv/parquet rows hold None for a missing cell
        raise DataError(f"missing field '{name}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(_type_problem(name, value))
    return value


def _type_problem(name: str, value: Any, expected: str = "a string") -> str:
    return f"field '{name}' must be {expected}, got {type(value).__name__}"


def _check_keys(format: str, columns: Mapping[str, str], allowed: set[str]) -> None:
    # A misspelt column_map key would otherwise be silently ignored.
    unknown = sorted(set(columns) - allowed)
    if unknown:
        raise ValueError(
            f"column_map keys {unknown} do not apply to format {format!r}; "
            f"expected some of {sorted(allowed)}"
        )
