"""Reading the user's files so that a bad one is one line naming the file and the line.

    read_json(path)          a JSON object from a config/tokenizer/adapter file
    check_text_file(path)    an empty file, or bytes that are not UTF-8 (with their line)
    locate_json_error(path)  the first line of a JSON / JSON-lines data file that does not parse

Light on purpose (no torch, no datasets): the tokenizer and model loaders use it too.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 24  # 16 MiB: a multi-GB data file is scanned without holding it in memory


def read_json(path: str | Path, *, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file, and the line and column of a
    syntax error, when it is empty, not UTF-8, not JSON or not an object."""
    path = Path(path)
    check_text_file(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data


def check_text_file(path: str | Path) -> None:
    """ValueError naming `path` when it is empty (or only whitespace) or not UTF-8; the bytes
    are read in chunks, so this costs one pass over the file at disk speed."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, seen_text, offset = 1, False, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.object is the end of the last chunk that began a character, then this one.
                bad = offset - (len(e.object) - len(chunk)) + e.start
                line += e.object[: e.start].count(b"\n")
                raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                 f"offset {bad}); re-save the file as UTF-8") from None
            line += chunk.count(b"\n")
            offset += len(chunk)
            seen_text = seen_text or bool(text.strip())
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: ends in the middle of a UTF-8 character (truncated?)") from None
    if not seen_text:
        raise ValueError(f"{path}: the file is empty")


def locate_json_error(path: str | Path) -> str | None:
    """Where a JSON data file goes wrong, as ``line N ...: <problem>``, or None if it parses.

    ``.jsonl`` / ``.ndjson`` files, and others whose first non-blank line is a JSON object,
    are read as JSON lines (one object per non-blank line); the rest as one JSON document
    (Alpaca files are one list). Called after a loader failed, to say where, so valid files
    are not parsed twice.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold \u2028
    numbered = [(n, raw) for n, raw in enumerate(lines, start=1) if raw.strip()]
    if not numbered:
        return None
    try:
        first = json.loads(numbered[0][1])
    except json.JSONDecodeError:
        first = None  # not one value per line: a document over several lines
    if not isinstance(first, dict) and Path(path).suffix not in (".jsonl", ".ndjson"):
        try:
            json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno}: {e.msg}"
        return None
    for number, raw in numbered:
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            return f"line {number} column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {number}: expected a JSON object per line, found a JSON {type(row).__name__}"
    return None
