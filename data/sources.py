"""Where SFT rows come from: a local file, a `datasets` builder with data files, or the Hub.

Everything goes through `datasets.load_dataset`, so split slicing (``train[:90%]``,
``train[90%:]``) works the same for a local file as for a Hub dataset; that is how configs carve
a held-out split out of one file. `datasets` is imported inside the function so that importing
``tunewright.data`` (and so ``tune --help``) stays fast.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator

from tunewright.data.files import check_text_file, locate_json_error

if TYPE_CHECKING:
    import datasets

# Builders that read `data_files`; a source with one of these file extensions is a local file.
_EXTENSION_TO_BUILDER = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
_BUILDERS = frozenset(_EXTENSION_TO_BUILDER.values())
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def load_rows(
    source: str,
    *,
    data_files: str | list[str] | None = None,
    split: str = "train",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Rows of one split, as a `datasets.Dataset`.

    `source` is one of:
      - a local file (``alpaca.json``, ``chats.jsonl``, ``x.parquet``, ``x.csv``; a ``.json``
        file may hold one JSON list, as Alpaca files do), builder chosen by extension;
      - a builder name (``json``, ``csv``, ``parquet``, ``text``, ``arrow``) plus `data_files`;
      - a local dataset directory or a Hub dataset name, passed to `datasets.load_dataset`.
    Extra keyword arguments (``name``, ``revision``, ``cache_dir``, ...) go to `load_dataset`.
    Raises ValueError, in one line, when the file is missing, empty or not UTF-8, or the dataset
    cannot be loaded (for a JSON file: the line that does not parse).
    """
    builder = _builder_for_file(source)
    if builder is not None:
        if data_files is not None:
            raise ValueError(
                f"dataset source {source!r} is a file; data_files is only for a builder name "
                f"such as 'json' (got data_files={data_files!r})"
            )
        _require_local_files([source])
        path, data_files = builder, source
        if _is_tsv(source):  # the csv builder splits on commas unless told otherwise
            load_kwargs.setdefault("sep", "\t")
    elif source in _BUILDERS:
        if data_files is None:
            raise ValueError(f"dataset source {source!r} is a builder and needs data_files")
        _require_local_files([data_files] if isinstance(data_files, str) else data_files)
        path = source
    else:
        path = source  # a local dataset directory or a Hub name

    import datasets  # lazy: slow to import

    local = _local_text_files(path, data_files)
    for file in local:  # an empty or non-UTF-8 file otherwise fails later, or never says where
        check_text_file(file)
    try:
        with _quiet_datasets():
            rows = datasets.load_dataset(path, data_files=data_files, split=split, **load_kwargs)
    except Exception as e:  # datasets raises many types; the user needs one clear line
        raise ValueError(_load_failure(source, split, local, e)) from e
    if not isinstance(rows, datasets.Dataset):  # e.g. streaming=True gives an IterableDataset
        raise ValueError(
            f"dataset {source!r} (split {split!r}) loaded as {type(rows).__name__}; "
            "SFT datasets need a map-style datasets.Dataset (streaming is not supported)"
        )
    return rows


def _load_failure(source: str, split: str, local: list[str], error: Exception) -> str:
    """One line for a failed load: the file and line where a JSON file breaks, else the
    innermost cause (datasets wraps the parser's error in its own generic one)."""
    for file in local:
        if _builder_for_file(file) == "json" and (where := locate_json_error(file)):
            return f"{file}: {where}"
    while error.__cause__ is not None or (error.__context__ is not None and not str(error).strip()):
        error = error.__cause__ or error.__context__
    if "corresponds to no data" in str(error):  # datasets' words for a split with no rows
        return f"dataset {source!r}: no rows in split {split!r} (an empty file, or a slice of nothing)"
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    return f"could not load dataset {source!r} (split {split!r}): {reason}"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # "Generating train split: 512 examples" and cache notices are datasets' business, not the
    # user's; they are restored afterwards for code that wants them.
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _local_text_files(path: str, data_files: str | list[str] | None) -> list[str]:
    """The plain local files of a text builder (json, csv, text) that can be checked as text."""
    if path not in ("json", "csv", "text") or data_files is None:
        return []
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    return [f for f in files if os.path.isfile(f) and not f.lower().endswith(_COMPRESSIONS)]


def _builder_for_file(source: str) -> str | None:
    """The builder for a path with a known data-file extension (``x.jsonl.gz`` too), else None."""
    return _EXTENSION_TO_BUILDER.get(_extension(source))


def _is_tsv(source: str) -> bool:
    return _extension(source) == ".tsv"


def _extension(source: str) -> str:
    name = source.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return os.path.splitext(name)[1]


def _require_local_files(paths: list[str]) -> None:
    # Fail on a typo with the path named, before `datasets` turns it into a long traceback.
    # Globs and URLs are left for `datasets` to resolve.
    for path in paths:
        if "://" in path or any(c in path for c in "*?["):
            continue
        if not os.path.isfile(path):
            raise ValueError(f"dataset file not found: {path}")
