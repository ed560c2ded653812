"""Outputs, runs, resume, checkpoints, adapters, merge-lora and convert-gguf: each bad input is one
line naming the directory, file or key, exit 2, and nothing the user had is changed or deleted.

The runs start from copies of one earlier tiny run per kind (full and LoRA, 2 steps, a checkpoint
after each), made once per test process.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from harness import TINY, Case, check, run_tune
from tunewright.training.tiny_assets import tiny_asset

_CACHE: dict[str, Path] = {}
_HELD_LOCKS: list[int] = []  # file descriptors of locks a case holds, as another run would


def earlier_run(kind: str = "lora") -> Path:
    """A finished 2-step run of `llama/tiny_<kind>` with checkpoints at steps 1 and 2."""
    if kind not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="tw-earlier-"))
        atexit.register(shutil.rmtree, root, True)
        out = root / "run"
        result = run_tune(["run", "sft", "--config", f"llama/tiny_{kind}", f"output_dir={out}", *TINY,
                           "save_every_n_steps=1"], cwd=root)
        assert result.code == 0, result.err[-2000:]
        _CACHE[kind] = out
    return _CACHE[kind]


def sft(tmp: Path, kind: str, *overrides: str) -> list[str]:
    return ["run", "sft", "--config", f"llama/tiny_{kind}", f"output_dir={tmp / 'out'}", *TINY, *overrides]


def rerun(*overrides: str, kind: str = "lora", setup: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    """A run into a copy of an earlier run's directory (then `setup(out)`), with `overrides`."""

    def argv(tmp: Path) -> list[str]:
        shutil.copytree(earlier_run(kind), tmp / "out")
        if setup is not None:
            setup(tmp / "out")
        return sft(tmp, kind, *overrides)

    return argv


def fresh(*overrides: str, kind: str = "full", setup: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    """A run into `tmp/out` (after `setup(tmp)`), with `overrides`."""

    def argv(tmp: Path) -> list[str]:
        if setup is not None:
            setup(tmp)
        return sft(tmp, kind, *overrides)

    return argv


def files(content: dict[str, str]) -> Callable[[Path], None]:
    """Write {relative path: text}, as a user's own files."""

    def make(root: Path) -> None:
        for name, text in content.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return make


def held_lock(out: Path) -> None:
    """The output directory as a live run holds it (an flock on its lock file)."""
    fd = os.open(out / ".tunewright.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242 otherhost\n", 0)
    _HELD_LOCKS.append(fd)


def truncate(name: str, step: int = 2) -> Callable[[Path], None]:
    def cut(out: Path) -> None:
        path = out / "checkpoints" / f"step_{step:06d}" / name
        path.write_bytes(path.read_bytes()[:100])

    return cut


def damage_all(out: Path) -> None:
    for step in (1, 2):
        truncate("model.trainable.safetensors", step)(out)


# ------------------------------------------------------------------ merge-lora / convert-gguf
def merge(*extra: str, out: str = "merged", setup: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    """`tune merge-lora` of the earlier LoRA run's adapter (copied to tmp/adapter) into its base."""

    def argv(tmp: Path) -> list[str]:
        shutil.copytree(earlier_run("lora") / "adapter", tmp / "adapter")
        if setup is not None:
            setup(tmp)
        return ["merge-lora", str(tiny_asset("llama")), str(tmp / "adapter"), "--output-dir", str(tmp / out), *extra]

    return argv


def gguf(*extra: str, out: str = "hf", setup: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        (tmp / "model.gguf").write_bytes(b"GGUF not really")
        if setup is not None:
            setup(tmp)
        return ["convert-gguf", str(tmp / "model.gguf"), "--output-dir", str(tmp / out), *extra]

    return argv


def adapter_edit(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda tmp: edit(tmp / "adapter")


def plot_empty_dir(tmp: Path) -> list[str]:
    """`tune plot` of a directory that holds no metrics.jsonl (not a run's output_dir)."""
    (tmp / "run").mkdir()
    return ["plot", str(tmp / "run"), "-o", str(tmp / "loss.png")]


def export_gguf(family: str, out_type: str) -> Callable[[Path], list[str]]:
    """`tune export-gguf` of a tiny `family` model into tmp/m.gguf."""
    return lambda tmp: ["export-gguf", str(tiny_asset(family)), "--out-type", out_type, "--output", str(tmp / "m.gguf")]


# Fragments: `{tmp}` is the case's directory.
CASES = [
    # -------------------------------------------------------------- outputs a user names
    Case("merge_lora_into_dir_of_unrelated_files", merge(setup=files({"merged/notes.txt": "mine"})),
         ["{tmp}/merged", "not empty", "notes.txt", "--force"], kept=["merged/notes.txt"]),
    Case("merge_lora_into_base_dir", lambda tmp: ["merge-lora", str(tiny_asset("llama")),
                                                  str(earlier_run("lora") / "adapter"), "--output-dir",
                                                  str(tiny_asset("llama"))],
         ["is the BASE_DIR", "elsewhere"]),
    Case("merge_lora_into_adapter_dir", merge(out="adapter"), ["is the ADAPTER_DIR"],
         kept=["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]),
    Case("merge_lora_output_is_a_file", merge(out="f", setup=files({"f": "x"})), ["{tmp}/f", "not a directory"],
         kept=["f"]),
    Case("merge_lora_adapter_dir_without_config",
         merge(setup=adapter_edit(lambda d: (d / "adapter_config.json").unlink())),
         ["adapter_config.json", "not a PEFT adapter"], absent=["merged"]),
    Case("merge_lora_missing_base", lambda tmp: ["merge-lora", str(tmp / "nobase"), str(earlier_run("lora") / "adapter"),
                                                 "--output-dir", str(tmp / "merged")],
         ["{tmp}/nobase"], absent=["merged"]),
    Case("convert_gguf_into_dir_of_unrelated_files", gguf(setup=files({"hf/data.csv": "a,b"})),
         ["{tmp}/hf", "not empty", "data.csv", "--force"], kept=["hf/data.csv"]),
    Case("convert_gguf_into_the_dir_holding_it", gguf("--force", out="."), ["holds the input"], kept=["model.gguf"]),
    Case("convert_gguf_output_is_a_file", gguf(out="f", setup=files({"f": "x"})), ["{tmp}/f", "not a directory"], kept=["f"]),
    Case("convert_gguf_missing_input", lambda tmp: ["convert-gguf", str(tmp / "no.gguf"), "--output-dir", str(tmp / "hf")],
         ["{tmp}/no.gguf"], absent=["hf"]),
    # -------------------------------------------------------------- run directories
    Case("rerun_into_an_earlier_run", rerun(), ["{tmp}/out", "holds an earlier run", "checkpoints up to step 2",
                                                "resume_from_checkpoint=auto", "overwrite_output_dir=true"],
         kept=["out/metrics.jsonl", "out/checkpoints/step_000002/train_state.pt", "out/adapter/adapter_config.json"]),
    Case("output_dir_holds_the_users_config_yaml", fresh(setup=files({"out/config.yaml": "my: config\n"})),
         ["holds an earlier run", "config.yaml, not written by a run"], kept=["out/config.yaml"]),
    Case("output_dir_is_a_file", fresh(setup=files({"out": "x"})), ["output_dir {tmp}/out", "not a directory"], kept=["out"]),
    Case("overwrite_and_resume_together", rerun("overwrite_output_dir=true", "resume_from_checkpoint=auto"),
         ["overwrite_output_dir", "resume_from_checkpoint"], kept=["out/checkpoints/step_000002/train_state.pt"]),
    Case("output_dir_locked_by_a_live_run", rerun("resume_from_checkpoint=auto", setup=held_lock),
         ["another run is writing there", "process 4242 on otherhost"], kept=["out/metrics.jsonl"]),
    Case("final_dir_holds_unrelated_files", fresh(setup=files({"out/final/notes.txt": "mine"})),
         ["{tmp}/out/final", "notes.txt", "move them"], kept=["out/final/notes.txt"], absent=["out/metrics.jsonl"]),
    Case("adapter_dir_holds_unrelated_files", fresh(kind="lora", setup=files({"out/adapter/weights.bin": "mine"})),
         ["{tmp}/out/adapter", "a PEFT adapter"], kept=["out/adapter/weights.bin"]),
    # -------------------------------------------------------------- resume
    Case("resume_with_changed_lora_rank", rerun("resume_from_checkpoint=auto", "lora_rank=4"),
         ["lora_rank 8 -> 4", "adapters' shapes", "step_000002"], kept=["out/checkpoints/step_000002/train_state.pt"]),
    Case("resume_with_changed_batch_size", rerun("resume_from_checkpoint=auto", "batch_size=3"),
         ["global batch (batch_size x data-parallel processes) 8 -> 3", "data order"], kept=["out/metrics.jsonl"]),
    Case("resume_with_changed_lr", rerun("resume_from_checkpoint=auto", "optimizer.lr=0.5"),
         ["optimizer.lr 0.01 -> 0.5", "restored from the checkpoint"]),
    Case("resume_with_changed_seed_and_dataset", rerun("resume_from_checkpoint=auto", "seed=7", "dataset.split=train"),
         ["dataset.split", "seed 0 -> 7"]),
    Case("resume_with_another_model", rerun("resume_from_checkpoint=auto", "model.path=${tiny:qwen2}"),
         ["model.path", "the model or its vocabulary"]),
    Case("resume_full_run_with_lora_added", rerun("resume_from_checkpoint=auto", "lora_rank=8", kind="full"),
         ["lora_rank", "adapters' shapes"]),
    Case("resume_from_a_path_that_is_no_checkpoint", fresh("resume_from_checkpoint=/nonexistent/step_9"),
         ["/nonexistent/step_9", "not a checkpoint directory"], absent=["out/metrics.jsonl"]),
    Case("resume_from_a_damaged_checkpoint_path",
         rerun("resume_from_checkpoint=out/checkpoints/step_000002", setup=truncate("model.trainable.safetensors")),
         ["step_000002 is damaged", "model.trainable.safetensors is truncated"],
         kept=["out/checkpoints/step_000001/train_state.pt"]),
    Case("resume_auto_every_checkpoint_damaged", rerun("resume_from_checkpoint=auto", setup=damage_all),
         ["no complete checkpoint", "step_000002", "truncated"], kept=["out/metrics.jsonl"]),
    # -------------------------------------------------------------- non-finite values
    Case("diverging_full_run", fresh("optimizer.lr=1e10", "max_steps=5", "save_every_n_steps=1"),
         ["step 3: non-finite loss", "checkpoints up to step 2 are kept", "nothing exported", "on_nonfinite=skip"],
         absent=["out/final", "out/checkpoints/step_000003"]),
    Case("diverging_lora_bf16_run", fresh("optimizer.lr=1e10", "max_steps=5", "dtype=bf16", kind="lora"),
         ["non-finite loss", "no checkpoint was saved"], absent=["out/adapter", "out/merged"]),
    Case("diverging_run_skips_past_the_limit", fresh("optimizer.lr=1e10", "max_steps=6", "on_nonfinite=skip",
                                                     "max_nonfinite_steps=1"),
         ["2 steps with a non-finite loss", "max_nonfinite_steps=1"], absent=["out/final"]),
    Case("skip_with_optimizer_in_backward", fresh("on_nonfinite=skip", "optimizer_in_backward=true",
                                                  "clip_grad_norm=null"),
         ["on_nonfinite: skip needs optimizer_in_backward: false"], absent=["out/metrics.jsonl"]),
    Case("on_nonfinite_unknown_value", fresh("on_nonfinite=ignore"), ["on_nonfinite", "'stop' | 'skip'"],
         absent=["out"]),
    Case("max_nonfinite_steps_zero", fresh("max_nonfinite_steps=0"), ["max_nonfinite_steps", ">= 1"], absent=["out"]),
    Case("diverging_run_as_a_process", fresh("optimizer.lr=1e10", "max_steps=4"), ["step 3: non-finite loss"],
         absent=["out/final"], subprocess=True),
    # -------------------------------------------------------------- tune plot
    Case("plot_of_a_directory_without_metrics", plot_empty_dir, ["run has no metrics.jsonl"], absent=["loss.png"]),
    # -------------------------------------------------------------- tune export-gguf, sft's export_gguf
    Case("export_gguf_out_type_we_cannot_write", export_gguf("llama", "q4_k"),
         ["GGUF output type 'q4_k' is not one we write", "f32, f16, bf16, q8_0"], absent=["m.gguf"]),
    Case("export_gguf_model_llama_cpp_cannot_represent", export_gguf("qwen3_moe", "f16"),
         ["qwen3_moe model has dense MLP blocks [0]", "'qwen3moe' cannot represent it"], absent=["m.gguf"]),
    Case("sft_export_gguf_of_a_model_llama_cpp_cannot_represent",
         lambda tmp: fresh(f"model.path={tiny_asset('qwen3_moe')}", "export_gguf=q8_0")(tmp),
         ["export_gguf: ", "dense MLP blocks [0]"], absent=["out"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_output(case: Case, tmp_path: Path) -> None:
    check(case, tmp_path)


def teardown_module() -> None:
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())
