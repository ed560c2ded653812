"""The `tune` command: ls, cp, run, validate, cat, download (torchtune's verbs).

Start-up must stay instant, so this module and the catalog import nothing heavy; torch,
OmegaConf and huggingface_hub are imported inside the command that needs them. Bad input ends
in one `error: ...` line on stderr and exit status 2; TUNEWRIGHT_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Sequence

import tunewright
from tunewright.training.errors import INTERRUPTED, USER_ERRORS, user_error_line
from tunewright.tune_cli.catalog import UsageError, cmd_cp, cmd_ls, suggest
from tunewright.tune_cli.config_cmds import cmd_cat, cmd_validate
from tunewright.tune_cli.download import DEFAULT_IGNORE, cmd_download

EPILOG = """\
examples:
  tune ls
  tune cp llama/tiny_full my_config.yaml
  tune run sft --config my_config.yaml epochs=2 ~max_steps
  tune run --nproc_per_node 2 sft --config llama/tiny_full_distributed
  tune cp sft my_sft.py && tune run my_sft.py --config llama/tiny_lora   # edit the loop
  tune validate my_config.yaml optimizer.lr=1e-4
  tune run generate --config llama/tiny_generate prompt="Reverse the letters: abc"
  tune download HuggingFaceTB/SmolLM2-135M --output-dir ./SmolLM2-135M
  tune quickstart                  # LoRA fine-tune of SmolLM2-135M-Instruct, offline

A config is code (its _component_ entries name the callables it runs): run configs you trust.
"""

RUN_HELP = """\
Run a recipe (a shipped name or a path to a .py file) with a config (a shipped name or a path to
a YAML file). Overrides `key=value` (`optimizer.lr=1e-4`) and `~key` (delete) apply on top; the
config is checked against the recipe's schema before any work starts.

Without torchrun flags the recipe runs in this process. With any of them, tune runs torchrun
(`python -m tunewright.tune_cli.launch FLAGS RECIPE.py --config CONFIG OVERRIDES`, which is
`torch.distributed.run`) and waits for it; Ctrl-C stops every process and prints one line.
torchrun flags (before RECIPE, `--flag V` or `--flag=V`, dashes or underscores):
  --nproc_per_node --nnodes --node_rank --master_addr --master_port --standalone
  --rdzv_endpoint --rdzv_backend --rdzv_id --rdzv_conf --max_restarts --monitor_interval
  --start_method --log_dir --redirects --tee --local_ranks_filter

A config is code: its `_component_`s may name callables of tunewright, torch and torchao only.
  --allow-components PKG[,PKG]   also allow these packages (or TUNEWRIGHT_ALLOW_COMPONENTS)
"""


COMMAND_MODULES = ("convert_gguf", "export_gguf", "merge_lora", "chat", "quickstart", "plot", "estimate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each command."""
    parser = _Parser(
        prog="tune",
        description="Fine-tune LLMs in plain PyTorch: recipes, YAML configs, torchrun launch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tune {tunewright.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ls", help="list recipes and their configs", description="List the "
                       "shipped recipes and, under each, the configs whose `recipe:` names it.")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser(
        "cp", help="copy a recipe or config to edit it",
        description="Copy a shipped recipe (.py) or config (.yaml) to DEST: a file or an existing "
        "directory; without a suffix DEST gets .py or .yaml.",
    )
    p.add_argument("name", metavar="NAME", help="recipe name or config name (llama/tiny_full)")
    p.add_argument("dest", metavar="DEST", help="destination file or directory")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.add_argument("--make-parents", action="store_true", help="create missing parent folders")
    p.set_defaults(handler=cmd_cp)

    # Parsed by run.parse_run_args (torchrun flags, then RECIPE, then overrides); this entry
    # only gives `tune --help` its line and `tune run --help` its text.
    sub.add_parser(
        "run", help="run a recipe with a config (torchrun flags launch workers)",
        usage="tune run [TORCHRUN FLAGS] RECIPE --config CONFIG [key=value | ~key ...]",
        description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )

    p = sub.add_parser(
        "validate", help="check a config against its recipe's schema",
        description="Load CONFIG with the overrides and check it against the schema of the recipe "
        "its `recipe:` key names, without running anything.",
    )
    _config_args(p)
    p.add_argument("--recipe", default=None, metavar="RECIPE",
                   help="check against this recipe (a name or a .py file) instead of the one the "
                   "config's `recipe:` names; a .py file a config names is never imported on its say")
    _allow_components_arg(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser(
        "cat", help="print a config (merged with overrides)",
        description="Print CONFIG as written; with overrides, print the merged config.",
    )
    _config_args(p)
    p.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser(
        "download", help="download a model from the Hugging Face Hub",
        description="Download a Hugging Face Hub repo (snapshot_download) into DIR.",
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. HuggingFaceTB/SmolLM2-135M")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="folder to download into")
    p.add_argument("--hf-token", default=None, metavar="T",
                   help="Hugging Face token for gated or private repos (default: HF_TOKEN or "
                   "the stored login)")
    p.add_argument("--ignore-patterns", nargs="*", default=DEFAULT_IGNORE, metavar="P",
                   help=f"glob patterns of files to skip (default: {' '.join(DEFAULT_IGNORE)}; "
                   "give the flag alone to download everything)")
    p.set_defaults(handler=cmd_download)

    # Commands in their own modules (each: add_parser(subparsers) registering handler=run);
    # importing them is cheap, their heavy imports happen when they run.
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"tunewright.tune_cli.{name}").add_parser(sub)
    return parser, sub.choices


def _allow_components_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-components", default="", metavar="PKG[,PKG]",
                   help="packages outside tunewright, torch and torchao whose callables the config "
                   "may name as `_component_` (also: TUNEWRIGHT_ALLOW_COMPONENTS); a config is code")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="config name (llama/tiny_full) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value|~key", help="overrides")


def _dispatch(argv: list[str]) -> int:
    parser, commands = build_parser()
    if not argv:
        parser.print_help()
        return 0
    first = argv[0]
    if first.startswith("-"):
        parser.parse_args(argv)  # --help / --version exit; anything else is an error
        raise UsageError(f"unknown option '{first}'; see `tune --help`")  # pragma: no cover
    if first not in commands:
        raise UsageError(
            f"unknown command '{first}'{suggest(first, list(commands))}; see `tune --help`"
        )
    if first == "run":
        from tunewright.tune_cli.run import HelpRequested, cmd_run

        try:
            return cmd_run(argv[1:])
        except HelpRequested:
            commands["run"].print_help()
            return 0
    # Intermixed, so options may follow the overrides (`tune cat CFG a=1 --resolve b=2`).
    args = commands[first].parse_intermixed_args(argv[1:])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except SystemExit as e:  # argparse's --help / --version, or a recipe calling sys.exit
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `tune cat CFG | head`: the reader left; Python's advice on EPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS as e:  # the same as `python recipe.py` (training/entry.py)
        if os.environ.get("TUNEWRIGHT_DEBUG"):
            raise
        print(user_error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
