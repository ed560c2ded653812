"""`tune estimate --config CONFIG [key=value ...] [--device cpu|h100|...] [--nproc N]`.

Will the run fit? The memory it needs per process, term by term, for this machine's CPU memory
or a named GPU, worked out on the meta device before any weight is loaded
(`training/estimate/`). Exit status 0 when it fits, 1 when it does not (the line says the
biggest term and the change that would make it fit), 2 for bad input.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tunewright.training.estimate.devices import GPUS  # plain data: no torch at start-up

    p = subparsers.add_parser(
        "estimate", help="will it fit? memory per process, before any weight loads",
        description="Estimate the memory a run of CONFIG (with overrides) needs per process: weights, "
        "gradients, optimizer state, adapters, activations, loss chunks, KV cache; compared with "
        "--device. Nothing is loaded: the model is built on the meta device (from model.path's "
        "config.json, or the size its directory name spells when it is not downloaded yet). Exit "
        "status 1 when it does not fit.",
    )
    p.add_argument("--config", required=True, metavar="CONFIG", help="config name (llama/tiny_lora) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value|~key", help="overrides")
    p.add_argument("--device", default="cpu", metavar="NAME",
                   help=f"cpu (this machine's memory, the default) or a GPU: {', '.join(GPUS)}")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes sharding the model with FSDP2/TP (torchrun's nproc_per_node x nnodes)")
    p.add_argument("--model-size", default=None, metavar="NAME",
                   help="a size table row (llama3_1_8b, qwen3_8b, ...) for a model not downloaded yet")
    p.add_argument("--recipe", default=None, metavar="RECIPE",
                   help="the recipe whose schema reads the config (default: the config's `recipe:`)")
    p.add_argument("--allow-components", default="", metavar="PKG[,PKG]",
                   help="packages outside tunewright, torch and torchao the config may name")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tunewright.training.estimate.devices import device_capacity
    from tunewright.tune_cli.catalog import find_config, find_recipe

    device_capacity(args.device)  # an unknown GPU name fails here, before anything is built
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    config_path, config_name = find_config(args.config)

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import import_recipe, load_recipe_config
    from tunewright.training.estimate import fit_report
    from tunewright.training.instantiate import components_allowed
    from tunewright.tune_cli.config_cmds import shipped_recipe_for_config

    with components_allowed(args.allow_components.split(",") if args.allow_components else []):
        if args.recipe is not None:
            recipe_path = find_recipe(args.recipe)[0]
        else:
            recipe = to_dict(load_config(config_path, args.overrides)).get("recipe")
            recipe_path = shipped_recipe_for_config(recipe, config_path)
            if recipe_path is None:
                raise ValueError(f"{config_path}: recipe {recipe} is a Python file; name it with --recipe FILE")
        cfg = load_recipe_config(import_recipe(recipe_path), config_path, args.overrides)
        fits, lines = fit_report(cfg, device=args.device, world_size=args.nproc, size=args.model_size,
                             name=f"{cfg.recipe} ({config_name or config_path})")
    print("\n".join(lines))
    return 0 if fits else 1
