"""From the config's tokenizer and datasets to the resumable batches a training loop iterates.

`build_data` runs before the model loads, so everything that can be known about the data is
checked here, in seconds: the model's config.json (its shape, its vocabulary), the tokenizer
files and chat template, every row of every dataset, and that the tokenizer's ids fit the model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

from tunewright.data.collate import collate_flat, collate_padded
from tunewright.data.sampler import ResumableSampler
from tunewright.training import distributed as dist
from tunewright.training.batching import Batches
from tunewright.training.instantiate import instantiate, resolve_component


def make_batches(
    dataset: Any,
    *,
    pad_id: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    group_by_length: bool = False,
    padding_free: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Batches:
    """Batches of this rank's shard, in a seeded order that `state_dict` can resume;
    `padding_free`: plain rows are collated flat on the host (`collate_flat`), else padded
    [b, s]; `num_workers`, `pin_memory`: as `Batches`."""
    lengths = getattr(dataset, "lengths", None) if group_by_length else None
    if group_by_length and lengths is None:
        raise ValueError("group_by_length: this dataset does not expose item lengths (packed data "
                         "needs no grouping: every row has max_seq_len tokens)")
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=dist.data_rank(),
        world_size=dist.data_world_size(),
        group_by_length=group_by_length, lengths=lengths, batch_size=batch_size,
    )
    # A dataset whose items are not plain rows (preference pairs) says how they batch.
    if hasattr(dataset, "collate"):
        collate = functools.partial(dataset.collate, pad_id=pad_id, padding_free=padding_free)
    else:
        collate = functools.partial(collate_flat if padding_free else collate_padded, pad_id=pad_id)
    return Batches(dataset, sampler, batch_size, collate, num_workers=num_workers, pin_memory=pin_memory)


def build_data(cfg: Any) -> tuple[Any, Batches, Batches | None]:
    """(tokenizer, train batches, validation batches or None) from `tokenizer`, `dataset`,
    `val_dataset`, `batch_size`, `shuffle`, `group_by_length`, `seed`, `padding_free`,
    `num_workers` and `pin_memory`; `model` is only read for its config.json."""
    model_dir, vocab_size = model_vocab(cfg.model)
    tokenizer = instantiate(cfg.tokenizer)
    datasets = {"dataset": instantiate(cfg.dataset, tokenizer=tokenizer)}
    if cfg.val_dataset is not None:
        datasets["val_dataset"] = instantiate(cfg.val_dataset, tokenizer=tokenizer)
    for dataset in datasets.values():
        warn_dropped_rows(dataset)
        if vocab_size is not None:
            check_ids_fit(dataset, tokenizer, vocab_size, model_dir)
    batching = dict(pad_id=tokenizer.pad_id, batch_size=cfg.batch_size, seed=cfg.seed,
                    padding_free=getattr(cfg, "padding_free", False), **loader_options(cfg))
    train = make_batches(datasets["dataset"], shuffle=cfg.shuffle, group_by_length=cfg.group_by_length, **batching)
    val = make_batches(datasets["val_dataset"], shuffle=False, **batching) if "val_dataset" in datasets else None
    return tokenizer, train, val


def loader_options(cfg: Any) -> dict[str, Any]:
    """`num_workers` and `pin_memory` of the config, null resolved for its device: on CUDA 2
    workers (collating a batch takes milliseconds; two processes keep well ahead of a GPU step)
    and pinned memory; elsewhere 0 (the loop collates in its own thread, which costs less than
    starting processes on a few CPU cores) and no pinning (only a GPU copy gains from it)."""
    import torch

    device = str(getattr(cfg, "device", "cpu"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    num_workers, pin_memory = getattr(cfg, "num_workers", None), getattr(cfg, "pin_memory", None)
    return {"num_workers": num_workers if num_workers is not None else (2 if cuda else 0),
            "pin_memory": pin_memory if pin_memory is not None else cuda}


def model_vocab(model_cfg: Mapping[str, Any]) -> tuple[Path | None, int | None]:
    """(directory, vocab_size) of the Hugging Face model a `model` node loads, from its
    config.json alone (a bad shape fails here, naming the file); (None, None) for a model
    component that is not read from such a directory."""
    from tunewright.models.pretrained import load_pretrained
    from tunewright.models.registry import model_args

    path = model_cfg.get("path")
    loads_hf = resolve_component(model_cfg["_component_"], where="key 'model._component_'") is load_pretrained
    if path is None or not (loads_hf or (Path(path) / "config.json").is_file()):
        return None, None
    return Path(path), model_args(path)[1].vocab_size


def warn_dropped_rows(dataset: Any) -> None:
    """Print (once, on rank 0) how many rows a dataset dropped for having no target token; on
    stdout with the run's other notes, stderr being for the one line of an error."""
    base = getattr(dataset, "dataset", dataset)  # a PackedDataset wraps the SFTDataset
    warning = base.dropped_warning() if hasattr(base, "dropped_warning") else None
    if warning and dist.is_main():
        print(warning, flush=True)


def check_ids_fit(dataset: Any, tokenizer: Any, vocab_size: int, model_dir: Path) -> None:
    """ValueError when the data (or the padding) holds a token id the model has no embedding
    for: a tokenizer of another model. Checked on the ids actually used, since many models
    have spare rows beyond their tokenizer and a few tokenizers list ids no text produces."""
    base = getattr(dataset, "dataset", dataset)
    largest = getattr(base, "max_token_id", -1)
    what = f"{getattr(base, 'source', 'the dataset')} holds token id {largest}"
    if tokenizer.pad_id >= vocab_size and tokenizer.pad_id > largest:
        largest, what = tokenizer.pad_id, f"its pad id is {tokenizer.pad_id}"
    if largest < vocab_size:
        return
    name = tokenizer.id_to_token(largest) if hasattr(tokenizer, "id_to_token") else None
    raise ValueError(
        f"the tokenizer does not fit the model: {what}{f' ({name!r})' if name else ''}, but "
        f"{model_dir / 'config.json'} has vocab_size {vocab_size} (the tokenizer has "
        f"{tokenizer.vocab_size} ids); use the model's own tokenizer"
    )
