"""Bad config values, types, overrides, config files, `tune run` flags and `_component_`s outside
the allow-list: each one line naming the key (or flag, or file) and what it must be, exit 2,
before any work (no output directory is created).

The last tests are not table rows: Ctrl-C on a real `tune run` (one process, and two under
torchrun) must end in one line and exit 130, with every process gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest

from harness import TINY, Case, check

OUT = "out"  # the run's output_dir: a config error must not even create it


def run(recipe: str, config: str, *overrides: str, flags: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    """`tune run [FLAGS] RECIPE --config llama/CONFIG` into the case's tmp dir, tiny and short."""
    tiny = TINY if recipe == "sft" else []
    out = [f"output_dir={{tmp}}/{OUT}"] if recipe != "generate" else []

    def argv(tmp: Path) -> list[str]:
        return ["run", *flags, recipe, "--config", f"llama/{config}",
                *(o.format(tmp=tmp) for o in [*out, *tiny, *overrides])]

    return argv


def sft(*overrides: str, config: str = "tiny_lora", flags: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return run("sft", config, *overrides, flags=flags)


def config_file(text: str, *extra: str) -> Callable[[Path], list[str]]:
    """`tune run sft --config FILE` with `text` written to FILE."""

    def argv(tmp: Path) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return ["run", "sft", "--config", str(tmp / "c.yaml"), *extra]

    return argv


def bound(key: str, value: str, wanted: str, **kw) -> Case:
    """A value of the right type outside its range: the line names key, bound, value and file."""
    recipe, config = kw.pop("recipe", "sft"), kw.pop("config", "tiny_lora")
    argv = sft(f"{key}={value}", config=config) if recipe == "sft" else run(recipe, config, f"{key}={value}")
    return Case(f"{recipe}-{key}={value}", argv, [f"llama/{config}.yaml: key '{key}' must be {wanted}, got"],
                absent=[OUT], **kw)


CASES = [
    # ---------------------------------------------------------------- ranges (issue 10, section 3)
    bound("batch_size", "0", ">= 1"),
    bound("epochs", "0", ">= 1"),
    bound("epochs", "-1", ">= 1"),
    bound("max_steps", "0", ">= 1 (null: no limit)"),
    bound("max_steps", "-3", ">= 1 (null: no limit)"),
    bound("max_steps_per_epoch", "0", ">= 1 (null: no limit)"),
    bound("gradient_accumulation_steps", "0", ">= 1"),
    bound("gradient_accumulation_steps", "-1", ">= 1"),
    bound("loss_chunk_size", "-1", ">= 1"),
    bound("clip_grad_norm", "-1.0", "> 0 (null: no clipping)"),
    bound("clip_grad_norm", "0", "> 0 (null: no clipping)"),
    bound("log_every_n_steps", "0", ">= 1"),
    bound("eval_every_n_steps", "0", ">= 1 (null: no validation)"),
    bound("save_every_n_steps", "-5", ">= 1 (null: no step checkpoints)"),
    bound("max_eval_batches", "0", ">= 1 (null: the whole set)"),
    bound("keep_last_n_checkpoints", "0", ">= 1 (null: keep all)"),
    bound("num_threads", "-1", ">= 1 or null"),
    bound("seed", "-1", ">= 0 and <= 4294967295"),
    bound("activation_checkpointing_every", "0", ">= 1"),
    bound("lora_rank", "0", ">= 1 (null: full fine-tuning)"),
    bound("lora_alpha", "0", "> 0"),
    bound("lora_dropout", "1.0", ">= 0 and < 1"),
    bound("lora_dropout", "-0.1", ">= 0 and < 1"),
    bound("device", "tpu9", "cpu, cuda, cuda:N, mps, xpu or auto"),
    bound("tensor_parallel_dim", "0", ">= 1", config="tiny_lora_distributed"),
    bound("data_parallel_dim", "-2", ">= 1 or null", config="tiny_lora_distributed"),
    bound("collective_timeout_minutes", "0", ">= 1", config="tiny_lora_distributed"),
    bound("max_new_tokens", "0", ">= 1", recipe="generate", config="tiny_generate"),
    bound("temperature", "-1", ">= 0 (0: greedy)", recipe="generate", config="tiny_generate"),
    bound("top_k", "0", ">= 1 (null: no top-k cut)", recipe="generate", config="tiny_generate"),
    bound("top_p", "0", "> 0 and <= 1 (null: no top-p cut)", recipe="generate", config="tiny_generate"),
    bound("batch_size", "0", ">= 1", recipe="evaluate", config="tiny_evaluate"),
    bound("max_answers", "0", ">= 1 or null", recipe="evaluate", config="tiny_evaluate"),
    Case("device-missing-gpu", sft("device=cuda:7"), ["device: cuda:7 was asked for but"], absent=[OUT]),
    # ---------------------------------------------------------------- types and keys
    Case("type-int", sft("batch_size=abc"), ["key 'batch_size' must be int, got 'abc'"], absent=[OUT]),
    Case("type-int-float", sft("max_steps=1.5"), ["key 'max_steps' must be int | null, got 1.5"], absent=[OUT]),
    Case("type-bool", sft("shuffle=maybe"), ["key 'shuffle' must be bool, got 'maybe'"], absent=[OUT]),
    Case("type-literal", sft("dtype=fp8"), ["key 'dtype' must be 'fp32' | 'bf16' | 'fp16', got 'fp8'"],
         absent=[OUT]),
    Case("unknown-key", sft("batch_sise=4"), ["unknown key 'batch_sise' (did you mean 'batch_size'?)"],
         absent=[OUT]),
    Case("unknown-component-arg", sft("optimizer.lrr=1"),
         ["unknown key 'optimizer.lrr': torch.optim.AdamW takes no argument 'lrr' (did you mean 'lr'?)"],
         absent=[OUT]),
    Case("lora-key-without-lora", sft("lora_alpha=32", config="tiny_full"),
         ["key 'lora_alpha' needs 'lora_rank' to be set"], absent=[OUT]),
    Case("prompt-not-a-string", run("generate", "tiny_generate", "prompt=42"),
         ["key 'prompt' must be str, got 42"]),
    # ---------------------------------------------------------------- overrides and config files
    Case("override-bad-yaml-list", sft("lora_targets=[q, v"), ["override 'lora_targets=[q, v': not valid YAML"],
         absent=[OUT]),
    Case("override-bad-yaml-quote", run("generate", "tiny_generate", 'prompt="abc'),
         ["override 'prompt=\"abc': not valid YAML"]),
    Case("override-no-equals", sft("max_steps"), ["override 'max_steps' must look like key=value or ~key"],
         absent=[OUT]),
    Case("override-delete-missing", sft("~nope"), ["cannot delete 'nope': no such key"], absent=[OUT]),
    Case("config-not-yaml", config_file("recipe: sft\nbatch_size: [1\n"), ["c.yaml: not valid YAML"]),
    Case("config-not-a-mapping", config_file("- recipe\n- sft\n"),
         ["c.yaml: the top level must be a mapping of keys to values"]),
    Case("config-missing", ["run", "sft", "--config", "nope.yaml"], ["config file not found: nope.yaml"]),
    Case("config-bad-interpolation", sft("output_dir=${{nope}}"), ["key 'output_dir': cannot resolve"]),
    Case("config-unset-env", sft("output_dir=${{oc.env:TUNEWRIGHT_TEST_UNSET}}"),
         ["key 'output_dir': cannot resolve", "Environment variable 'TUNEWRIGHT_TEST_UNSET' not found"]),
    Case("config-for-another-recipe", run("generate", "tiny_lora"),
         ["config llama/tiny_lora is for recipe 'sft', not 'generate'"]),
    # ---------------------------------------------------------------- tune run flags (torchrun's)
    Case("nproc-not-a-number", sft(flags=("--nproc_per_node", "abc")),
         ["--nproc_per_node 'abc': must be a number of processes per node >= 1"], absent=[OUT]),
    Case("nproc-zero", sft(flags=("--nproc_per_node=0",)), ["--nproc_per_node '0': must be"], absent=[OUT]),
    Case("nnodes-range-reversed", sft(flags=("--nnodes", "4:2")), ["--nnodes '4:2': must be"], absent=[OUT]),
    Case("master-port-range", sft(flags=("--master_port", "99999")),
         ["--master_port '99999': must be a port number, 1 to 65535"], absent=[OUT]),
    Case("start-method", sft(flags=("--start_method", "thread")),
         ["--start_method 'thread': must be spawn, fork or forkserver"], absent=[OUT]),
    Case("unknown-flag", sft(flags=("--nprocs_per_node", "2")),
         ["unknown option '--nprocs_per_node' for tune run", "did you mean '--nproc_per_node'"], absent=[OUT]),
    Case("flag-after-recipe", ["run", "sft", "--config", "llama/tiny_lora", "--nproc_per_node", "2"],
         ["torchrun flags go before RECIPE"]),
    Case("config-flag-without-value", ["run", "sft", "--config"], ["--config needs a value"]),
    # ---------------------------------------------------------------- the component allow-list
    Case("component-os-system", sft("optimizer._component_=os.system"),
         ["key 'optimizer._component_': os.system is outside the packages a config may call",
          "--allow-components os"], absent=[OUT]),
    Case("component-nested", sft("lr_scheduler._component_=subprocess.run"),
         ["key 'lr_scheduler._component_': subprocess.run is outside"], absent=[OUT]),
    Case("component-denied-in-torch", sft("optimizer._component_=torch.hub.load"),
         ["torch.hub.load loads or runs code its arguments name", "--allow-components torch.hub"],
         absent=[OUT]),
    Case("component-bad-allow-flag", sft(flags=("--allow-components", "my-pkg")),
         ["--allow-components: 'my-pkg' is not a dotted package path"], absent=[OUT]),
    Case("component-bad-allow-env", sft(), ["TUNEWRIGHT_ALLOW_COMPONENTS: 'a b' is not a dotted package path"],
         absent=[OUT], env={"TUNEWRIGHT_ALLOW_COMPONENTS": "a b"}),
    Case("component-validate", ["validate", "llama/tiny_lora", "dataset._component_=builtins.exec"],
         ["key 'dataset._component_': builtins.exec is outside"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_config(case, tmp_path):
    check(case, tmp_path)


# ------------------------------------------------------------------ Ctrl-C on a real run
def interrupt(argv: list[str], cwd: Path, *, group: bool, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `tune ARGV`, wait for its first logged step, send SIGINT (to its process group, as a
    terminal's Ctrl-C does, or to `tune` alone) and collect what it printed."""
    tune = Path(sys.executable).parent / "tune"
    env = {**{k: v for k, v in os.environ.items() if k != "TUNEWRIGHT_DEBUG"},
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # SIGINT at its default, as a terminal's foreground job has it: an ignored SIGINT is inherited
    # through exec (and respected, as by any program), and a test worker may carry one.
    proc = subprocess.Popen([str(tune), *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 2 "):
                break
        assert seen and seen[-1].startswith("step 2 "), "".join(seen) + proc.stderr.read()
        (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)


def workers_of(tmp_path: Path) -> list[str]:
    """Processes still running this test's output_dir (none may outlive the interrupt)."""
    found = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [p for p in found if str(tmp_path) in p]


LONG = ["max_steps=100000", "epochs=1000", "progress_bar=false", "num_threads=1", "eval_every_n_steps=null",
        "save_every_n_steps=null", "log_every_n_steps=1"]


def test_ctrl_c_on_one_process_prints_one_line(tmp_path):
    done = interrupt(["run", "sft", "--config", "llama/tiny_lora", f"output_dir={tmp_path / 'out'}", *LONG],
                     tmp_path, group=True)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["error: interrupted"]


@pytest.mark.slow
@pytest.mark.parametrize("group", [True, False], ids=["terminal-ctrl-c", "sigint-to-tune"])
def test_ctrl_c_on_two_processes_prints_one_line(tmp_path, group):
    done = interrupt(["run", "--nproc_per_node", "2", "sft", "--config", "llama/tiny_lora_distributed",
                      f"output_dir={tmp_path / 'out'}", *LONG], tmp_path, group=group)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["error: interrupted: stopped torchrun and its workers"]
    assert workers_of(tmp_path) == []
