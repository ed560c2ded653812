"""SFT data pipeline: load rows, format them as chat, tokenize with shifted labels, pack, batch.

    sources.py   load_rows: local json/jsonl/csv/parquet, builder + data_files, or Hub name
    formats.py   row -> messages: instruct (Alpaca), chat (messages / ShareGPT), text; DataError
    sft.py       SFTDataset (tokens + already-shifted labels) and sft_dataset, the config entry
    packing.py   PackedDataset: fixed-length rows with per-document input_pos and doc_ids
    collate.py   collate_padded: right-padded [b, s] batches with token/target counts
    sampler.py   ResumableSampler: sharded, seeded, length-grouped, resumable mid-epoch

Names are re-exported lazily (module `__getattr__`) so that importing `tunewright.data` does
not import torch or datasets: the `tune` CLI must start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunewright.data.collate import collate_padded
    from tunewright.data.formats import DataError
    from tunewright.data.packing import PackedDataset
    from tunewright.data.sampler import ResumableSampler
    from tunewright.data.sft import SFTDataset, sft_dataset
    from tunewright.data.sources import load_rows

_EXPORTS = {
    "sft_dataset": "sft",
    "SFTDataset": "sft",
    "PackedDataset": "packing",
    "collate_padded": "collate",
    "ResumableSampler": "sampler",
    "load_rows": "sources",
    "DataError": "formats",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
