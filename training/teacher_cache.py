"""The teacher's top-k next-token log-probabilities cached to disk, so that later epochs of a
distillation run read them instead of running the teacher (`teacher_top_k` in
recipes/knowledge_distillation.py).

What a row holds, per target token of one dataset example (key: the example's index in the
training dataset, so a shuffled epoch finds its rows): the `k` ids the teacher ranks highest,
their log-probabilities log softmax(teacher_logits / temperature) over the whole vocabulary
(not renormalised), and `tail`, the log of the mass of every other id (exact, from the full
logits). The divergence is then taken between two distributions over k + 1 outcomes, the
top-k ids and "any other id", with the student's side from its full log-softmax gathered at
the ids and summed over the rest:

    p_T = (exp(logprobs), exp(tail)),   p_S = (softmax_S[ids], 1 - Σ softmax_S[ids])

This is the full-vocabulary divergence of the two distributions with the ids outside the
teacher's top k merged into one outcome, so every `kd_loss` stays a divergence (≥ 0, 0 when
the student is the teacher) and, by the data-processing inequality, at most the full one;
with top_k = the vocabulary size there is no tail and it is the full divergence. Per kind:
forward_kl loses only how the student spreads the tail mass (the teacher's tail is small);
reverse_kl and generalized_jsd also stop seeing student mass on ids the teacher left out as
anything but tail mass. Unlike Axolotl's sparse forward KL (teacher top-k renormalised to
sum 1, student log-softmax gathered at the ids, no tail), the student is pushed to leave
exactly the teacher's tail mass outside the top k, and the reverse divergences stay ≥ 0.

How it fills: an off-policy micro-batch whose rows are all cached uses them and the teacher
does not run; any other runs the live teacher (the exact full-vocabulary divergence) and
caches its rows. So epoch 1 is the live run, and epoch 2 onward reads the cache. On-policy
steps (`lmbda`) score the student's fresh samples: they always run the teacher.

On disk (`teacher_cache_dir`, default <output_dir>/teacher_cache): `manifest.json` (what
the rows depend on: the teacher, its dtype, the tokenizer, the dataset, temperature, top_k;
another run's cache is refused in one line) and safetensors shards, each written under a
temporary name and renamed, flushed when `rows_per_shard` examples are buffered and at each
checkpoint, so `resume_from_checkpoint: auto` finds the rows of the steps before it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tunewright.training import distributed as dist
from tunewright.training.distill import Kind, log_prob_divergence

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TopK:
    """The teacher's top-k at n target positions."""

    ids: torch.Tensor  # [n, k] int64
    logprobs: torch.Tensor  # [n, k] fp32, log softmax(teacher_logits / temperature), not renormalised
    tail: torch.Tensor  # [n] fp32, log of the mass outside the top k (-inf when k is the vocabulary)

    @classmethod
    def of_logits(cls, logits: torch.Tensor, *, k: int, temperature: float) -> "TopK":
        log_t = F.log_softmax(logits.float() / temperature, dim=-1)
        logprobs, ids = log_t.topk(min(k, log_t.shape[-1]), dim=-1)
        return cls(ids, logprobs, log_t.scatter(-1, ids, float("-inf")).logsumexp(-1))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> "TopK":
        return TopK(self.ids[rows], self.logprobs[rows], self.tail[rows])

    def to(self, device: torch.device | str) -> "TopK":
        return TopK(self.ids.to(device).long(), self.logprobs.to(device), self.tail.to(device))

    def divergence(self, student_logits: torch.Tensor, *, kind: Kind, beta: float, temperature: float) -> torch.Tensor:
        """Per-row divergence [n] of the student's logits [n, vocab] from these top-k rows, over
        the k ids and (below the vocabulary size) the tail outcome."""
        log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        student, teacher = log_s.gather(-1, self.ids), self.logprobs
        if self.ids.shape[1] < log_s.shape[-1]:
            student_tail = log_s.scatter(-1, self.ids, float("-inf")).logsumexp(-1)
            student = torch.cat([student, student_tail[:, None]], dim=-1)
            teacher = torch.cat([teacher, self.tail[:, None]], dim=-1)
        return log_prob_divergence(student, teacher, kind=kind, beta=beta)


def cat(parts: list[TopK]) -> TopK:
    return TopK(*(torch.cat([getattr(p, name) for p in parts]) for name in ("ids", "logprobs", "tail")))


# ---------------------------------------------------------------- batches that know their examples
class _Indexed:
    """A dataset whose items are (index, item): the collate below keeps the indices."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _collate_with_ids(collate: Callable[[list], dict], items: list[tuple[int, Any]]) -> dict:
    from tunewright.data.tokenizer.base import IGNORE_INDEX

    batch = collate([item for _, item in items])
    batch["example_ids"] = [index for index, _ in items]
    # the collated targets are the items' targets, item after item: the cache splits them so
    batch["example_targets"] = [int((torch.as_tensor(item["labels"]) != IGNORE_INDEX).sum()) for _, item in items]
    return batch


def with_example_ids(batches: Any) -> Any:
    """The same `Batches` (sampler, order, workers), each batch also carrying `example_ids`
    (dataset indices) and `example_targets` (each one's target tokens)."""
    from tunewright.training.batching import Batches

    return Batches(_Indexed(batches.dataset), batches.sampler, batches.batch_size,
                   functools.partial(_collate_with_ids, batches.collate), num_workers=batches.num_workers,
                   pin_memory=batches.pin_memory)


# ---------------------------------------------------------------- the cache
class TeacherCache:
    def __init__(self, directory: str | Path, *, identity: dict[str, Any], top_k: int, temperature: float,
                 rows_per_shard: int = 256) -> None:
        self.directory, self.top_k, self.temperature = Path(directory), top_k, temperature
        self.rows_per_shard = rows_per_shard
        self._check_manifest({**identity, "top_k": top_k, "temperature": temperature})
        self._index: dict[int, tuple[Path, int, int]] = {}  # example -> (shard, first row, end row)
        self._seen: set[str] = set()
        self._buffer: dict[int, TopK] = {}
        self._next_shard = 0
        self._refresh()

    def _check_manifest(self, identity: dict[str, Any]) -> None:
        """Rank 0 writes the manifest of a new cache; every rank compares an existing one."""
        path = self.directory / MANIFEST
        if dist.is_main() and not path.is_file():
            from tunewright.training.atomic import atomic_write_text

            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(identity, sort_keys=True, indent=1))
        dist.barrier()
        found = json.loads(path.read_text(encoding="utf-8"))
        for key in sorted(set(found) | set(identity)):
            if found.get(key) != identity.get(key):
                raise ValueError(
                    f"teacher_cache_dir: {path} was written with {key} {json.dumps(found.get(key))}, this run has "
                    f"{json.dumps(identity.get(key))}: its rows are not this teacher's; delete {self.directory} or "
                    "set teacher_cache_dir to another folder")

    def _refresh(self) -> None:
        """Index the shards written since the last look (this process's and the others')."""
        from safetensors import safe_open

        prefix = f"rank{dist.rank()}-"
        for path in sorted(self.directory.glob("rank*-*.safetensors")):
            if path.name.startswith(prefix):
                self._next_shard = max(self._next_shard, int(path.stem.split("-")[1]) + 1)
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            with safe_open(str(path), framework="pt") as shard:
                examples, offsets = shard.get_tensor("example_ids").tolist(), shard.get_tensor("offsets").tolist()
            for example, start, end in zip(examples, offsets, offsets[1:]):
                self._index[example] = (path, start, end)

    def _row(self, example: int, num_targets: int) -> TopK:
        from safetensors import safe_open

        if example in self._buffer:
            row = self._buffer[example]
        else:
            path, start, end = self._index[example]
            with safe_open(str(path), framework="pt") as shard:
                row = TopK(*(shard.get_slice(name)[start:end] for name in ("ids", "logprobs", "tail")))
        if len(row) != num_targets:
            raise ValueError(f"teacher_cache_dir: example {example} has {len(row)} cached targets, the dataset "
                             f"{num_targets}: the data changed since {self.directory} was written; delete it")
        return row

    def teacher_options(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """`distillation_loss` options for a batch: its cached top-k when every process has all
        its rows (the teacher of a sharded run is one collective: all processes run it or none),
        else a recorder that caches the live teacher's rows. Nothing for a batch without
        example ids (held-out batches, the student's own samples)."""
        if "example_ids" not in batch:
            return {}
        examples = batch["example_ids"]

        def missing() -> bool:
            return dist.any_rank(any(e not in self._buffer and e not in self._index for e in examples), device)

        gap = missing()
        if gap:
            self._refresh()  # rows another process or an earlier run wrote since
            gap = missing()
        if not gap:
            rows = [self._row(e, n) for e, n in zip(examples, batch["example_targets"])]
            return {"teacher_top_k": cat(rows).to(device)}
        return {"on_teacher_logits": self._recorder(examples, batch["example_targets"])}

    def _recorder(self, examples: list[int], counts: list[int]) -> Callable[[torch.Tensor], None]:
        chunks: list[TopK] = []

        def record(logits: torch.Tensor) -> None:  # the teacher's logits at the next targets, in order
            chunks.append(TopK.of_logits(logits, k=self.top_k, temperature=self.temperature).to("cpu"))
            if sum(map(len, chunks)) == sum(counts):  # the batch's last chunk: split into its examples
                rows, start = cat(chunks), 0
                for example, n in zip(examples, counts):
                    self._buffer[example] = rows[start:start + n]
                    start += n
                if len(self._buffer) >= self.rows_per_shard:
                    self.flush()
        return record

    def flush(self) -> None:
        """Write the buffered rows as one shard (temporary name, then renamed)."""
        from safetensors.torch import save_file

        from tunewright.training.atomic import file_mode

        if not self._buffer:
            return
        examples = sorted(self._buffer)
        rows = cat([self._buffer[e] for e in examples])
        offsets = torch.tensor([0] + [len(self._buffer[e]) for e in examples]).cumsum(0)
        path = self.directory / f"rank{dist.rank()}-{self._next_shard:06d}.safetensors"
        tmp = self.directory / f".{path.name}.tmp-{os.getpid()}"
        save_file({"example_ids": torch.tensor(examples), "offsets": offsets, "ids": rows.ids.int().contiguous(),
                   "logprobs": rows.logprobs.contiguous(), "tail": rows.tail.contiguous()}, str(tmp))
        os.chmod(tmp, file_mode())  # as the run's other outputs (the temporary file is private)
        os.replace(tmp, path)
        self._next_shard += 1
        self._buffer.clear()
        self._refresh()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "absent"


def model_identity(node: dict[str, Any], *, files: tuple[str, ...] = ("config.json", "tokenizer.json"),
                   weights: bool = True) -> dict[str, Any]:
    """What a model (or tokenizer) node loads: the node, and for a directory the digests of its
    `files` and its weight files' names and sizes (not their digest: hashing a teacher's weights
    would take as long as a pass over them)."""
    identity: dict[str, Any] = {"node": json.loads(json.dumps(node, sort_keys=True, default=str))}
    path = node.get("path")
    if path is not None and Path(path).is_dir():
        for name in files:
            identity[name] = _file_digest(Path(path) / name)
        if weights:
            identity["weights"] = {p.name: p.stat().st_size for p in sorted(Path(path).glob("*.safetensors"))}
    return identity


def open_teacher_cache(cfg: Any, train: Any, output_dir: Path) -> tuple[TeacherCache | None, Any]:
    """The run's cache and its training batches (carrying example ids) when `teacher_top_k` is
    set; (None, `train`) otherwise."""
    if cfg.teacher_top_k is None:
        return None, train
    identity = {"teacher": model_identity(cfg.teacher_model), "teacher_dtype": cfg.teacher_dtype or cfg.dtype,
                "tokenizer": model_identity(cfg.tokenizer, files=("tokenizer.json", "tokenizer_config.json"),
                                            weights=False),
                "dataset": model_identity(cfg.dataset)["node"],
                "num_examples": len(train.dataset)}
    directory = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else output_dir / "teacher_cache"
    cache = TeacherCache(directory, identity=identity, top_k=cfg.teacher_top_k, temperature=cfg.temperature)
    return cache, with_example_ids(train)
