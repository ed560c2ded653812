"""The tiny model and dataset that every `tiny` config trains, made here, offline, in seconds.

`${tiny:llama}` (or any family with a `tiny` row: `${tiny:qwen3}`, ...) in a config is a
directory holding a random small model of that family in Hugging Face format
(config.json, model.safetensors, a byte-level BPE tokenizer.json with ChatML special tokens and
chat template); `${tiny:sft}` an Alpaca-style JSONL file of small string tasks (reverse, upper-
case, add) that the tiny model learns within a few dozen steps. Both are deterministic and
cached under `$TUNEWRIGHT_CACHE` (default `~/.cache/tunewright`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Callable

VERSION = "v1"  # bump when the generated content changes, so caches are rebuilt

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("TUNEWRIGHT_CACHE", Path.home() / ".cache" / "tunewright"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_tokenizer_json() -> dict:
    """A valid HF `tokenizer.json`: one token per byte (id = byte value), no merges, specials."""
    vocab = {ch: b for b, ch in sorted(bytes_to_unicode().items())}
    added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def make_tiny_model(out: Path, family: str = "llama") -> None:
    """A random model of `family` (its `tiny` row) with the byte-level ChatML tokenizer."""
    import torch

    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model, save_pretrained
    from tunewright.models.registry import get_family

    args = get_family(family).tiny
    if args is None:
        raise ValueError(f"model family '{family}' has no tiny row to build a test model from")
    model = build_model(args, device="cpu")
    init_weights(model, seed=1234)
    save_pretrained(model, out, dtype=torch.float32)
    (out / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json(), ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 258, "pad_token_id": 256}))


def _task(rng: random.Random) -> dict[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
    kind = rng.choice(["reverse", "upper", "add"])
    if kind == "reverse":
        return {"instruction": "Reverse the letters.", "input": word, "output": word[::-1]}
    if kind == "upper":
        return {"instruction": "Write the word in capitals.", "input": word, "output": word.upper()}
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}


def make_tiny_sft(out: Path, *, num_rows: int = 512, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_task(rng)) for _ in range(num_rows)]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")


def _pair(rng: random.Random) -> dict[str, str]:
    """A tiny task with its right answer (chosen) and a near miss (rejected)."""
    task = _task(rng)
    prompt = f"{task['instruction']} {task['input']}".strip()
    right = task["output"]
    wrong = {"Reverse the letters.": task["input"], "Write the word in capitals.": right.lower()}.get(
        task["instruction"], str(int(right) + rng.choice([-2, -1, 1, 2, 10])) if right.isdigit() else right)
    if wrong == right:  # a palindrome
        wrong = right + right[-1]
    return {"prompt": prompt, "chosen": right, "rejected": wrong}


def make_tiny_pairs(out: Path, *, num_rows: int = 256, seed: int = 0) -> None:
    """Preference pairs (TRL's standard form) on the tiny tasks, for the DPO-family configs."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(_pair(rng)) + "\n" for _ in range(num_rows)))


def make_tiny_kto(out: Path, *, num_rows: int = 256, seed: int = 0) -> None:
    """KTO's unpaired examples: each pair's chosen (label true) or rejected (false) answer."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_rows):
        pair = _pair(rng)
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tiny_teacher(out: Path, *, steps: int = 20, seed: int = 7) -> None:
    """`${tiny:llama_teacher}`: a wider tiny Llama (dim 192) of the same tokenizer, trained
    `steps` SFT steps on the tiny configs' train split: a teacher that knows the tiny tasks
    better than the random `${tiny:llama}` student, for the distillation configs."""
    import dataclasses

    import torch

    from tunewright.data.collate import collate_flat
    from tunewright.data.sft import sft_dataset
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model, save_pretrained
    from tunewright.models.registry import get_family
    from tunewright.training.objectives import causal_lm_loss

    make_tiny_model(out, "llama")
    args = dataclasses.replace(get_family("llama").tiny, dim=192, num_heads=6, intermediate_dim=384)
    model = build_model(args, device="cpu")
    init_weights(model, seed=seed)
    data = sft_dataset(load_tokenizer(out), source=str(tiny_asset("sft")), split="train[:90%]")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        rows = [data[order[(step * 16 + i) % len(order)]] for i in range(16)]
        loss, n = causal_lm_loss(model, collate_flat(rows))
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_pretrained(model, out / "teacher", dtype=torch.float32)  # its weights and config replace the random model's
    for name in ("config.json", "model.safetensors"):
        os.replace(out / "teacher" / name, out / name)
    shutil.rmtree(out / "teacher")


def make_tiny_steps(out: Path, *, num_rows: int = 256, seed: int = 0) -> None:
    """Step-labelled arithmetic chains (TRL's PRM form, `data/step_labels.py`), half with one
    corrupted step, for the process-reward-model configs."""
    from tunewright.data.step_labels import chain_steps

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_rows):
        terms = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 4))]
        expression = terms[0] + "".join(f" {rng.choice('+-')} {t}" for t in terms[1:])
        steps, labels = chain_steps(expression, rng, corrupt=i % 2 == 1)
        rows.append({"prompt": f"{expression} = ?\n", "completions": steps, "labels": labels})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


ASSETS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name -> (maker writing into a directory, the path inside it that configs use)
    "sft": (make_tiny_sft, "train.jsonl"),
    "llama_teacher": (make_tiny_teacher, ""),
    "pairs": (make_tiny_pairs, "train.jsonl"),
    "kto": (make_tiny_kto, "train.jsonl"),
    "steps": (make_tiny_steps, "train.jsonl"),
}


def _asset(name: str) -> tuple[Callable[[Path], None], str, str]:
    """(maker, path inside its directory, cache key: changes when what it makes changes)."""
    if name in ASSETS:
        return (*ASSETS[name], VERSION)
    from tunewright.models.registry import all_families

    families = {f.name: f for f in all_families() if f.tiny is not None}
    if name not in families:
        raise ValueError(f"unknown tiny asset '{name}' (known: {', '.join([*ASSETS, *families])})")
    # The row is part of the key, so editing a family's tiny row never reuses a stale model.
    row = hashlib.sha256(repr(families[name].tiny).encode()).hexdigest()[:8]
    return functools.partial(make_tiny_model, family=name), "", f"{VERSION}-{row}"


def tiny_asset(name: str) -> Path:
    """Path of a tiny asset, making it first if it is not cached yet (safe across processes).

    Names: `sft`, or a model family (`llama`, `qwen2`, ...) for its tiny random model."""
    maker, inner, key = _asset(name)
    final = cache_root() / "tiny" / f"{name}-{key}"
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        maker(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return final / inner if inner else final
