"""`tune convert-gguf GGUF_FILE --output-dir DIR [--dtype fp32|bf16] [--force]`.

Turns a llama.cpp GGUF (llama architecture, byte-level BPE tokenizer) into a Hugging Face
model directory that recipes and transformers load. Self-contained: `add_parser` registers the
command on the `tune` subparsers; `run` is its handler (heavy imports happen inside it).
"""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("fp32", "bf16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-gguf", help="convert a llama GGUF (llama.cpp) to a Hugging Face model directory",
        description="Dequantize a llama-architecture GGUF (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, "
        "Q2_K-Q6_K) into DIR: config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json (with the chat template) and generation_config.json.",
    )
    p.add_argument("gguf_file", metavar="GGUF_FILE", help="path to the .gguf file")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32",
                   help="dtype of the written weights (default: fp32)")
    p.add_argument("--force", action="store_true",
                   help="write into DIR even if it holds files that are not a Hugging Face model "
                   "(the written files replace theirs; nothing else is deleted)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tunewright.models.gguf_import import gguf_to_hf
    from tunewright.training.atomic import OutputExistsError

    # Bad input raises ValueError/OSError; `tune`'s main turns it into one `error:` line.
    try:
        out = gguf_to_hf(args.gguf_file, args.output_dir, dtype=args.dtype, overwrite=args.force)
    except OutputExistsError as e:
        raise e.with_flag("--force") from None
    print(f"Converted {args.gguf_file} to {out}")
    return 0
