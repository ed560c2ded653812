"""`tune export-gguf MODEL_DIR --out-type f32|f16|bf16|q8_0 [--output FILE] [--force]`.

Writes a Hugging Face model directory (a `final/` or `merged/` a recipe wrote, a download) as
one GGUF file for llama.cpp / Ollama. Self-contained: `add_parser` registers the command on the
`tune` subparsers; `run` is its handler (heavy imports happen inside it).
"""

from __future__ import annotations

import argparse

OUT_TYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")  # models/gguf_export.py's OUT_TYPES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-gguf", help="write a Hugging Face model directory as a GGUF file (llama.cpp, Ollama)",
        description="Convert MODEL_DIR (config.json, safetensors, tokenizer) into one GGUF file with "
        "llama.cpp's architecture, tensor names and tokenizer metadata: Llama/SmolLM2, Mistral, "
        "Mixtral, Qwen2/3, Qwen3-MoE, Gemma 1/2/3, Phi-3. Norms and biases stay F32.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    p.add_argument("--out-type", required=True, metavar="TYPE",
                   help=f"type of the weights: {', '.join(OUT_TYPE_CHOICES)}")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="the .gguf file to write (default: MODEL_DIR-TYPE.gguf beside MODEL_DIR)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tunewright.models.gguf_export import export_gguf

    # Bad input (an --out-type we cannot write included) raises ValueError: one `error:` line.
    out = export_gguf(args.model_dir, args.out_type, args.output, overwrite=args.force)
    print(f"Wrote {out} ({args.out_type})")
    return 0
