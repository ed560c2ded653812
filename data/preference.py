"""Preference data: pairs (DPO, IPO, SimPO, ORPO, reward models) and unpaired examples (KTO).

Rows come in the conventions users already have; each row's form is read from its values:

    TRL conversational  {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}
    TRL standard        {"prompt": "text", "chosen": "text", "rejected": "text"}
    torchtune / implicit prompt
                        {"chosen": [whole conversation], "rejected": [whole conversation]}
                        (both share every message up to the trailing assistant turns)
    KTO, unpaired       {"prompt": ..., "completion": ..., "label": true | false}

`column_map` maps our names (`prompt`, `chosen`, `rejected`, `completion`, `label`, and
`role` / `content` inside messages) to the dataset's. Each conversation (prompt + answer) is
rendered once with the model's chat template, as `SFTDataset` does; the labels keep only the
answer (the prompt's earlier assistant turns are context, not targets). Too long a row keeps the
END of its prompt (the part next to the answer) and the whole answer; a pair whose answer does
not fit even then is dropped and counted (`dropped_warning`), never trained on half an answer.
Chosen and rejected keep the same prompt tokens.

Items:  pairs    {"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}
        unpaired {"tokens", "labels", "label": bool}
(lists of ints, labels already shifted as in `data/sft.py`). `collate_pairs` stacks a batch of
pairs as chosen rows 0..B-1 then rejected rows B..2B-1 through `collate_padded`, so chosen and
rejected go through the model in one padding-free forward; `collate_unpaired` adds KTO's
mismatched (prompt_i, completion_{i-1}) rows for its KL estimate, as TRL builds them.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterable, Iterator, Mapping, Sequence, Sized

import numpy as np
import torch

from tunewright.data.collate import collate_flat, collate_padded
from tunewright.data.formats import DataError, chat_messages
from tunewright.data.sft import _describe, plain_ids
from tunewright.data.sources import load_rows
from tunewright.data.tokenizer.base import IGNORE_INDEX, Message, TokenCount, Tokenizer
from tunewright.data.tokenizer.chat import ChatTemplateError

_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "margin", "role", "content")
Answer = list[Message]


# ---------------------------------------------------------------- rows -> messages
def _check_column_map(column_map: Mapping[str, str] | None) -> dict[str, str]:
    columns = dict(column_map or {})
    unknown = sorted(set(columns) - set(_FIELDS))
    if unknown:  # a misspelt key would otherwise be silently ignored
        raise ValueError(f"column_map keys {unknown} do not apply to preference data; expected some of "
                         f"{list(_FIELDS)}")
    return columns


def _messages(value: Any, column: str, columns: Mapping[str, str], *, default_role: str) -> list[Message]:
    """A cell as messages: a string is one `default_role` message; a list is checked as chat
    messages (roles, string contents), errors naming `column`."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    inner = {"messages": column, "role": columns.get("role", "role"), "content": columns.get("content", "content")}
    return chat_messages({column: value}, column_map=inner)


def _cell(row: Mapping[str, Any], field: str, columns: Mapping[str, str]) -> tuple[str, Any]:
    column = columns.get(field, field)
    value = row.get(column)
    if value is None:
        raise DataError(f"missing field '{column}'")
    return column, value


def _split_answer(conversation: list[Message], column: str) -> tuple[list[Message], Answer]:
    """(prompt, trailing assistant turns) of a whole conversation (the implicit-prompt form)."""
    start = len(conversation)
    while start > 0 and conversation[start - 1]["role"] == "assistant":
        start -= 1
    if start == len(conversation):
        raise DataError(f"field '{column}' ends with a {conversation[-1]['role']!r} message, not the "
                        "assistant's answer")
    return conversation[:start], conversation[start:]


def _prompt_and_answers(row: Mapping[str, Any], names: Sequence[str], columns: Mapping[str, str],
                        system_prompt: str | None) -> tuple[list[Message], list[Answer]]:
    """The prompt messages and one answer per field in `names` (`chosen`/`rejected`, or
    `completion`), in any of the forms the module docstring lists."""
    cells = [_cell(row, name, columns) for name in names]
    prompt_column = columns.get("prompt", "prompt")
    if row.get(prompt_column) is not None:
        prompt = _messages(row[prompt_column], prompt_column, columns, default_role="user")
        answers = [_messages(value, column, columns, default_role="assistant") for column, value in cells]
        for (column, _), answer in zip(cells, answers):
            if not any(m["role"] == "assistant" for m in answer):
                raise DataError(f"field '{column}' holds no assistant message")
    else:  # torchtune's form: whole conversations sharing their prompt
        if any(isinstance(value, str) for _, value in cells):
            raise DataError(f"missing field '{prompt_column}' (string answers need a prompt column; "
                            "without one, give whole conversations as lists of messages)")
        split = [_split_answer(_messages(v, c, columns, default_role="assistant"), c) for c, v in cells]
        prompt, answers = split[0][0], [answer for _, answer in split]
        for (column, _), (other, _) in zip(cells[1:], split[1:]):
            if other != prompt:
                raise DataError(f"fields '{cells[0][0]}' and '{column}' do not share their prompt (the "
                                "messages before the final assistant turns differ)")
    if system_prompt is not None:  # a configured system prompt replaces the row's own
        prompt = [{"role": "system", "content": system_prompt}, *(m for m in prompt if m["role"] != "system")]
    return prompt, answers


# ---------------------------------------------------------------- messages -> tokens
@contextlib.contextmanager
def _whole_conversations(tokenizer: Tokenizer) -> Iterator[None]:
    # A tokenizer's own max_seq_len keeps a conversation's START, which would cut the answer;
    # here the prompt's start goes instead (`_fit`), so the tokenizer must return it whole.
    limit = getattr(tokenizer, "max_seq_len", None)
    if limit is None:
        yield
        return
    tokenizer.max_seq_len = None
    try:
        yield
    finally:
        tokenizer.max_seq_len = limit


def _encode(tokenizer: Tokenizer, prompt: list[Message], answer: Answer, chat_template: bool
            ) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, answer ids, answer trained-mask): the conversation rendered and tokenized
    once; the prompt is where that agrees with the prompt alone followed by the generation
    prompt, the answer's mask is the template's assistant mask past it."""
    if chat_template:
        prompt_ids, _ = tokenizer.tokenize_messages(prompt, add_generation_prompt=True)
        ids, trained = tokenizer.tokenize_messages([*prompt, *answer])
    else:
        prompt_ids, _ = plain_ids(tokenizer, prompt)
        ids, trained = plain_ids(tokenizer, [*prompt, *answer])
    shared = 0
    for a, b in zip(prompt_ids, ids):
        if a != b:
            break
        shared += 1
    return ids[:shared], ids[shared:], trained[shared:]


def _labels(tokens: np.ndarray, trained: np.ndarray) -> list[int]:
    """Shifted labels, as `SFTDataset`: labels[i] = tokens[i + 1] where that token is trained."""
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
    return labels.tolist()


class _Rows:
    """What pairs and unpaired examples share: reading rows, tokenizing their conversations,
    fitting them into `max_seq_len`, counting what is dropped, and checking their ids."""

    def __init__(self, *, max_seq_len: int | None, tokenizer: Tokenizer, source: str, chat_template: bool) -> None:
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        limits = [n for n in (max_seq_len, getattr(tokenizer, "max_seq_len", None)) if n is not None]
        self.limit = min(limits) if limits else None
        self.source, self.chat_template, self.tokenizer = source, chat_template, tokenizer
        self.num_rows_read = self.num_cut = self.num_empty = 0
        self._sequences: list[np.ndarray] = []  # every row's token ids, for max_token_id / fingerprint

    def read(self, rows: Iterable[Mapping[str, Any]], what: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
        from tqdm.auto import tqdm  # lazy; disable=None hides the bar when not on a terminal

        total = len(rows) if isinstance(rows, Sized) else None
        index = -1
        try:
            with _whole_conversations(self.tokenizer):
                for index, row in enumerate(tqdm(rows, total=total, desc=f"tokenizing {what}", disable=None)):
                    self.num_rows_read += 1
                    yield index, row
        except UnicodeDecodeError:  # a parquet/arrow/Hub column holding bytes that are not UTF-8
            raise DataError(f"{self.source} row {index}: text that is not valid UTF-8") from None

    def encode(self, index: int, prompt: list[Message], answer: Answer) -> tuple[list[int], list[int], list[bool]]:
        try:
            return _encode(self.tokenizer, prompt, answer, self.chat_template)
        except (DataError, ChatTemplateError) as e:
            raise DataError(f"{self.source} row {index}: {e}") from None

    def fit(self, prompt: list[int], answers: list[tuple[list[int], list[bool]]]
            ) -> list[tuple[np.ndarray, list[int]]] | None:
        """Each answer after the same (end of the) prompt, as (tokens, labels); None (counted)
        when an answer has no target token or does not fit `limit` with a prompt token."""
        if not all(any(trained) for _, trained in answers):
            self.num_empty += 1
            return None
        if self.limit is not None:
            room = self.limit - max(len(ids) for ids, _ in answers)
            if room < 1:  # the answer alone fills the row: no prompt token to predict it from
                self.num_cut += 1
                return None
            prompt = prompt[-room:]
        out = []
        for ids, trained in answers:
            tokens = np.asarray(prompt + ids, dtype=np.int64)
            mask = np.asarray([False] * len(prompt) + list(trained), dtype=np.bool_)
            out.append((tokens, _labels(tokens, mask)))
        if not all(any(t != IGNORE_INDEX for t in labels) for _, labels in out):  # no token before it
            self.num_empty += 1
            return None
        self._sequences += [tokens.astype(np.int32) for tokens, _ in out]
        return out

    def nothing_left(self, kept: int, what: str) -> None:
        if kept:
            return
        if self.num_rows_read == 0:
            raise DataError(f"{self.source}: no rows")
        raise DataError(f"{self.source}: no {what} left to train on ({self.drop_reasons()}); raise "
                        "max_seq_len or shorten the prompts")

    def drop_reasons(self) -> str:
        reasons = []
        if self.num_cut:
            reasons.append(f"{self.num_cut} whose answer does not fit max_seq_len={self.limit}")
        if self.num_empty:
            reasons.append(f"{self.num_empty} with an answer that has nothing to train on")
        return ", ".join(reasons)

    def warning(self, kept: int, what: str) -> str | None:
        dropped = self.num_cut + self.num_empty
        if not dropped:
            return None
        return (f"warning: {self.source}: dropped {dropped} of {dropped + kept} {what} "
                f"({self.drop_reasons()})")

    def max_token_id(self) -> int:
        return max((int(s.max()) for s in self._sequences if len(s)), default=-1)

    def fingerprint(self) -> str:
        """A hash of every token id, in order: cached per-row values (reference log-probs)
        belong to exactly this data."""
        digest = hashlib.sha256()
        for s in self._sequences:
            digest.update(len(s).to_bytes(4, "little"))
            digest.update(s.tobytes())
        return digest.hexdigest()[:16]


# ---------------------------------------------------------------- pairs
def _collate_rows(rows: list[dict[str, Any]], pad_id: int, padding_free: bool) -> dict[str, Any]:
    """Plain rows batched as training batches are: flat on the host when padding-free
    (`collate_flat`: [1, T], `row_ids`, `num_rows`), else padded [rows, s]."""
    return (collate_flat if padding_free else collate_padded)(rows, pad_id=pad_id)


def collate_pairs(items: Sequence[Mapping[str, Any]], *, pad_id: int, padding_free: bool = False) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen answers, then the B rejected ones (row i and row
    B + i are a pair), in the format plain rows get (`collate_padded`, or `collate_flat` when
    `padding_free`), plus `num_pairs` (B). Precomputed reference log-probs on the items
    (`ref_chosen_logps`, `ref_rejected_logps`) become [B] float32 tensors, as live ones are."""
    rows = [{"tokens": item[f"{side}_tokens"], "labels": item[f"{side}_labels"]}
            for side in ("chosen", "rejected") for item in items]
    batch = _collate_rows(rows, pad_id, padding_free)
    batch["num_pairs"] = len(items)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "margin"):  # margin: reward models
        if key in items[0]:
            batch[key] = torch.tensor([item[key] for item in items], dtype=torch.float32)
    return batch


def _margin(row: Mapping[str, Any], column: str, where: str) -> float | None:
    """TRL's optional `margin` column (how much better chosen is: a reward model's
    Bradley-Terry margin), a number; None without the column."""
    if column not in row or row[column] is None:
        return None
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(f"{where}: column '{column}' holds {value!r}; a margin must be a number")
    return float(value)


class _Tokenized(torch.utils.data.Dataset):
    """What pair and unpaired datasets share: rows read and tokenized once, eagerly (`_add` per
    row), the dropped ones counted, the ids checked. `source` names the rows in errors."""

    what = "rows"  # in messages

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        column_map: Mapping[str, str] | None = None,
        max_seq_len: int | None = None,
        system_prompt: str | None = None,
        source: str = "dataset",
        chat_template: bool = True,
    ) -> None:
        columns = _check_column_map(column_map)
        self.source = source
        self._rows = _Rows(max_seq_len=max_seq_len, tokenizer=tokenizer, source=source, chat_template=chat_template)
        self._items: list[tuple] = []
        for index, row in self._rows.read(rows, self.what):
            self._add(index, row, columns, system_prompt)
        self._rows.nothing_left(len(self._items), self.what)

    def _add(self, index: int, row: Mapping[str, Any], columns: Mapping[str, str], system_prompt: str | None) -> None:
        raise NotImplementedError

    def dropped_warning(self) -> str | None:
        """One line counting what was dropped (answer past max_seq_len, nothing to train on), or None."""
        return self._rows.warning(len(self._items), self.what)

    @property
    def max_token_id(self) -> int:
        return self._rows.max_token_id()

    def fingerprint(self) -> str:
        return self._rows.fingerprint()

    def __len__(self) -> int:
        return len(self._items)


class PreferenceDataset(_Tokenized):
    """Tokenized preference pairs from `rows` (a `datasets.Dataset` or any iterable of dicts)."""

    what = "pairs"
    collate = staticmethod(collate_pairs)  # how `make_batches` batches these items

    def _add(self, index: int, row: Mapping[str, Any], columns: Mapping[str, str], system_prompt: str | None) -> None:
        try:
            prompt, (chosen, rejected) = _prompt_and_answers(row, ("chosen", "rejected"), columns, system_prompt)
        except DataError as e:
            raise DataError(f"{self.source} row {index}: {e}") from None
        if chosen == rejected:
            raise DataError(f"{self.source} row {index}: chosen and rejected are identical, so there is "
                            "nothing to prefer; fix or remove the row")
        prompt_ids, chosen_ids, chosen_mask = self._rows.encode(index, prompt, chosen)
        _, rejected_ids, rejected_mask = self._rows.encode(index, prompt, rejected)
        margin = _margin(row, columns.get("margin", "margin"), f"{self.source} row {index}")
        fitted = self._rows.fit(prompt_ids, [(chosen_ids, chosen_mask), (rejected_ids, rejected_mask)])
        if fitted is not None:
            (c_tokens, c_labels), (r_tokens, r_labels) = fitted
            self._items.append((c_tokens, c_labels, r_tokens, r_labels, margin))

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair (chosen + rejected), for length-grouped sampling."""
        return [len(c) + len(r) for c, _, r, _, _ in self._items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, chosen_labels, rejected, rejected_labels, margin = self._items[index]
        item = {"chosen_tokens": chosen.tolist(), "chosen_labels": chosen_labels,
                "rejected_tokens": rejected.tolist(), "rejected_labels": rejected_labels}
        if margin is not None:
            item["margin"] = margin
        return item


def preference_dataset(
    tokenizer: Tokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    max_seq_len: TokenCount | None = None,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> PreferenceDataset:
    """The pairs a config names, e.g.

    .. code-block:: yaml

        dataset:
          _component_: tunewright.data.preference.preference_dataset
          source: pairs.jsonl              # prompt/chosen/rejected, any form in the docstring
          split: train[:90%]
          max_seq_len: 1024

    `source`, `data_files` and `split` as `load_rows`; `chat_template: false` joins the texts
    without the chat format (TRL's standard form on a base model, see `plain_ids`)."""
    _check_column_map(column_map)  # before the possibly long load
    rows, described = _load(source, data_files, split)
    return PreferenceDataset(rows, tokenizer, column_map=column_map, max_seq_len=max_seq_len,
                             system_prompt=system_prompt, source=described, chat_template=chat_template)


def _load(source: str, data_files: str | list[str] | None, split: str) -> tuple[Any, str]:
    rows = load_rows(source, data_files=data_files, split=split)
    described = _describe(source, data_files, split)
    if len(rows) == 0:
        raise DataError(f"{described}: no rows (an empty file or split)")
    return rows, described


# ---------------------------------------------------------------- unpaired (KTO)
def _label(row: Mapping[str, Any], columns: Mapping[str, str]) -> bool:
    column, value = _cell(row, "label", columns)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise DataError(f"field '{column}' must be true (desirable) or false (undesirable), got {value!r}")


def _prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the completion: labels are shifted, so the first target sits one before."""
    return next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1


def collate_unpaired(items: Sequence[Mapping[str, Any]], *, pad_id: int, padding_free: bool = False) -> dict[str, Any]:
    """KTO's batch: the examples as plain rows (`collate_pairs` says how), `label` [B] bool,
    `num_pairs` (B: the loss terms), and under `kl` a batch of the mismatched rows
    (prompt_i, completion_{i-1}), TRL's rotation, whose log-ratios estimate the KL term."""
    batch = _collate_rows([{"tokens": it["tokens"], "labels": it["labels"]} for it in items], pad_id, padding_free)
    batch["label"] = torch.tensor([bool(it["label"]) for it in items])
    batch["num_pairs"] = len(items)
    mismatched = []
    for i, item in enumerate(items):
        other = items[i - 1]  # i = 0 takes the last: (x_1, y_B), (x_2, y_1), ...
        cut, other_cut = _prompt_length(item["labels"]), _prompt_length(other["labels"])
        tokens = list(item["tokens"][:cut]) + list(other["tokens"][other_cut:])
        labels = [IGNORE_INDEX] * (cut - 1) + list(other["labels"][other_cut - 1:])
        mismatched.append({"tokens": tokens, "labels": labels})
    batch["kl"] = _collate_rows(mismatched, pad_id, padding_free)
    return batch


class UnpairedPreferenceDataset(_Tokenized):
    """KTO's examples: a prompt, one completion and whether it is desirable (`label`). Both
    kinds must be present: KTO weighs desirable against undesirable answers."""

    what = "examples"
    collate = staticmethod(collate_unpaired)

    def __init__(self, rows: Iterable[Mapping[str, Any]], tokenizer: Tokenizer, **options: Any) -> None:
        super().__init__(rows, tokenizer, **options)
        desirable = sum(label for _, _, label in self._items)
        if desirable in (0, len(self._items)):
            kind = "desirable (label true)" if desirable else "undesirable (label false)"
            label_column = dict(options.get("column_map") or {}).get("label", "label")
            raise DataError(f"{self.source}: all {len(self._items)} examples are {kind}; KTO needs both "
                            f"desirable and undesirable completions (check the '{label_column}' column)")

    def _add(self, index: int, row: Mapping[str, Any], columns: Mapping[str, str], system_prompt: str | None) -> None:
        try:
            prompt, (completion,) = _prompt_and_answers(row, ("completion",), columns, system_prompt)
            label = _label(row, columns)
        except DataError as e:
            raise DataError(f"{self.source} row {index}: {e}") from None
        prompt_ids, ids, mask = self._rows.encode(index, prompt, completion)
        fitted = self._rows.fit(prompt_ids, [(ids, mask)])
        if fitted is not None:
            self._items.append((fitted[0][0], fitted[0][1], label))

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t, _, _ in self._items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens, labels, label = self._items[index]
        return {"tokens": tokens.tolist(), "labels": labels, "label": label}


def unpaired_preference_dataset(
    tokenizer: Tokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    max_seq_len: TokenCount | None = None,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> UnpairedPreferenceDataset:
    """KTO's examples a config names (`prompt`, `completion`, boolean `label`), as
    `preference_dataset`."""
    _check_column_map(column_map)
    rows, described = _load(source, data_files, split)
    return UnpairedPreferenceDataset(rows, tokenizer, column_map=column_map, max_seq_len=max_seq_len,
                                     system_prompt=system_prompt, source=described, chat_template=chat_template)
