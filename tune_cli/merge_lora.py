"""`tune merge-lora BASE_DIR ADAPTER_DIR --output-dir DIR [--dtype fp32|bf16|fp16] [--force]`.

Adds a PEFT LoRA adapter (ours or one saved by `peft`) to its base model and writes the merged
weights in Hugging Face format, offline. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge-lora", help="merge a LoRA adapter into its base model (HF format out)",
        description="Load BASE_DIR (Hugging Face model directory), add the PEFT adapter in "
        "ADAPTER_DIR, merge it into the weights and write DIR (config and tokenizer files "
        "copied from BASE_DIR). Refuses an adapter whose shapes do not match the base, and a DIR "
        "that holds anything but a Hugging Face model unless --force.",
    )
    p.add_argument("base_dir", metavar="BASE_DIR", help="the model the adapter was trained on")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter_config.json + adapter_model.safetensors")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the merged model goes")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the written weights (default: fp32)")
    p.add_argument("--force", action="store_true",
                   help="write into DIR even if it holds files that are not a Hugging Face model "
                   "(the written files replace theirs; nothing else is deleted)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunewright.models import load_pretrained, save_pretrained
    from tunewright.models.peft_adapter import load_peft_adapter, read_adapter_config
    from tunewright.models.pretrained import HF_MODEL
    from tunewright.modules.peft.apply import merge_lora
    from tunewright.training.atomic import OutputExistsError, check_output_dir

    out_dir = Path(args.output_dir)
    for given, what in ((args.base_dir, "BASE_DIR"), (args.adapter_dir, "ADAPTER_DIR")):
        if out_dir.resolve() == Path(given).resolve():
            raise ValueError(f"--output-dir {out_dir} is the {what}; write the merged model elsewhere")
    try:  # before minutes of loading: a DIR we must not write into fails now
        check_output_dir(out_dir, HF_MODEL, overwrite=args.force)
        read_adapter_config(args.adapter_dir)  # fail on a non-adapter dir before loading the base
        model = load_pretrained(args.base_dir)
        load_peft_adapter(model, args.adapter_dir)
        merge_lora(model)
        out = save_pretrained(model, out_dir, source_dir=args.base_dir, dtype=args.dtype, overwrite=args.force)
    except OutputExistsError as e:
        raise e.with_flag("--force") from None
    print(f"merged {args.adapter_dir} into {args.base_dir}: wrote {out}")
    return 0
