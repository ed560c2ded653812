"""The FSDP2 recipes against the single-device ones, on CPU with gloo: 2 processes x batch 2 must
give the per-step losses of 1 process x batch 4 (fp32, rel 1e-5), the same exported model and
adapter, resume exactly, and run as one process without torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunewright.training.entry import run_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPES, CONFIGS = REPO / "recipes", REPO / "configs" / "llama"
STEPS = 6
COMMON = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", f"max_steps={STEPS}"]
NO_SAVES = ["save_every_n_steps=null"]


def torchrun(recipe: str, config: str, overrides: list[str], *, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           str(RECIPES / f"{recipe}.py"), "--config", str(CONFIGS / f"{config}.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(got: Path, want: Path) -> None:
    expected = losses(want)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(got) == pytest.approx(expected, rel=1e-5)


def max_logit_diff(a: Path, b: Path) -> float:
    from tunewright.models import load_pretrained

    tokens = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (load_pretrained(a)(tokens) - load_pretrained(b)(tokens)).abs().max().item()


# ---------------------------------------------------------------- runs shared by the tests
@pytest.fixture(scope="module")
def single_full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_full")
    run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_full.yaml",
                    [f"output_dir={out}", "batch_size=4", *COMMON, *NO_SAVES])
    return out


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_lora")
    run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_lora.yaml",
                    [f"output_dir={out}", "batch_size=4", *COMMON, *NO_SAVES])
    return out


@pytest.fixture(scope="module")
def two_lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_lora")
    torchrun("sft", "tiny_lora_distributed",
             [f"output_dir={out}", "batch_size=2", *COMMON, "save_every_n_steps=3"])
    return out


# ---------------------------------------------------------------- full fine-tuning
@pytest.mark.slow
def test_full_two_processes_equal_one_device(single_full, tmp_path):
    out = tmp_path / "two"
    torchrun("sft", "tiny_full_distributed",
             [f"output_dir={out}", "batch_size=2", *COMMON, *NO_SAVES])
    assert_same_losses(out, single_full)
    # Written file by file from gathered shards: same files as the one-device export, same model.
    assert sorted(p.name for p in (out / "final").iterdir()) == sorted(p.name for p in (single_full / "final").iterdir())
    assert max_logit_diff(out / "final", single_full / "final") <= 1e-5


@pytest.mark.slow
def test_full_tensor_parallel_equals_one_device(single_full, tmp_path):
    # tp=2, dp=1: both ranks see the whole batch of 4 and split each layer's heads.
    out = tmp_path / "tp"
    torchrun("sft", "tiny_full_distributed",
             [f"output_dir={out}", "batch_size=4", "tensor_parallel_dim=2", *COMMON, *NO_SAVES])
    assert_same_losses(out, single_full)
    assert max_logit_diff(out / "final", single_full / "final") <= 1e-5


def test_one_process_without_torchrun(single_full, tmp_path):
    out = tmp_path / "one"
    history = run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_full_distributed.yaml",
                              [f"output_dir={out}", "batch_size=4", *COMMON, *NO_SAVES])
    assert len(history) == STEPS
    assert_same_losses(out, single_full)
    assert max_logit_diff(out / "final", single_full / "final") <= 1e-5
    assert not torch.distributed.is_initialized()  # the recipe's own group is gone again


# ---------------------------------------------------------------- LoRA
@pytest.mark.slow
def test_lora_two_processes_equal_one_device(single_lora, two_lora):
    from safetensors.torch import load_file

    assert_same_losses(two_lora, single_lora)
    got, want = two_lora / "adapter", single_lora / "adapter"
    assert json.loads((got / "adapter_config.json").read_text()) == json.loads((want / "adapter_config.json").read_text())
    a, b = load_file(str(got / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): a weight whose gradient is near zero moves by ~lr on rounding
    # alone (one element in 2048 differs by 5e-5 on the untruncated tiny data); the merged
    # model's logits are the tight check.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)
    assert max_logit_diff(two_lora / "merged", single_lora / "merged") <= 1e-5
    # Each sharded step checkpoint also holds the adapter of its step (gathered like the final one).
    assert (two_lora / "checkpoints" / "step_000003" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_resume_gives_identical_losses(two_lora, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(two_lora, out)
    shutil.rmtree(out / "checkpoints" / "step_000006")  # as if stopped after the step-3 checkpoint
    torchrun("sft", "tiny_lora_distributed",
             [f"output_dir={out}", "batch_size=2", *COMMON, "save_every_n_steps=3",
              "resume_from_checkpoint=auto"])
    assert losses(out) == losses(two_lora)  # bit-identical, every step once


@pytest.mark.slow
def test_qlora_two_processes_equal_one_device(tmp_path):
    pytest.importorskip("torchao")
    # NF4 shards need each weight's scale blocks to split evenly: the tiny MLP layers do.
    qlora = [*COMMON, *NO_SAVES, "quantize_base=true", "lora_targets=[gate,up,down]",
             "max_steps=4", "save_final_model=false"]
    single = tmp_path / "single"
    run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_lora.yaml",
                    [f"output_dir={single}", "batch_size=4", *qlora])
    two = tmp_path / "two"
    torchrun("sft", "tiny_lora_distributed", [f"output_dir={two}", "batch_size=2", *qlora])
    assert losses(two) == pytest.approx(losses(single), rel=1e-5)


# ---------------------------------------------------------------- bad inputs
def test_tensor_parallel_dim_not_dividing_world_is_one_line(tmp_path):
    cmd = [sys.executable, str(RECIPES / "sft.py"), "--config",
           str(CONFIGS / "tiny_full_distributed.yaml"), f"output_dir={tmp_path}", "tensor_parallel_dim=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensor_parallel_dim=3 does not divide the world size 1" in lines[0], done.stderr


@pytest.mark.parametrize("override, message", [
    ("data_parallel_dim=2", "data_parallel_dim=2 x tensor_parallel_dim=1 must equal the world size 1"),
    ("model.dtype=fp32", "use `_component_: tunewright.models.load_pretrained` with only `path`"),
])
def test_bad_parallel_settings_fail_before_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_recipe_file(RECIPES / "sft.py", CONFIGS / "tiny_full_distributed.yaml",
                        [f"output_dir={tmp_path}", override])
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------- loading and export, one process
@pytest.fixture
def one_process_group():
    from tunewright.training.parallel import build_mesh, close_distributed, init_distributed

    device, created = init_distributed(torch.device("cpu"))
    yield build_mesh(device, data_parallel_dim=None, tensor_parallel_dim=1)
    close_distributed(created)


def split_checkpoint(src: Path, out: Path) -> Path:
    """A copy of `src` whose tensors are spread over two files with an index, as large Hub
    checkpoints are, so that export must keep that sharding."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in files.items():
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3_moe"])  # plain, fused qkv, experts
def test_sharded_load_and_export_round_trip(family, one_process_group, tmp_path):
    import copy

    from safetensors.torch import load_file

    from tunewright.training.parallel import build_meta_model, materialize, shard_fsdp2
    from tunewright.training.sharded_io import load_hf_sharded, save_pretrained_sharded
    from tunewright.training.tiny_assets import tiny_asset

    source = split_checkpoint(tiny_asset(family), tmp_path / "source")
    model, _ = build_meta_model({"_component_": "tunewright.models.load_pretrained", "path": str(source)},
                                torch.float32)
    skeleton = copy.deepcopy(model)
    shard_fsdp2(model, one_process_group["dp"])
    materialize(model, torch.device("cpu"))
    load_hf_sharded(model, source, dtype=torch.float32)
    out = save_pretrained_sharded(model, skeleton, tmp_path / "out", source_dir=source)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for fname in set(index.values()):
        got, want = load_file(str(out / fname)), load_file(str(source / fname))
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("family, lora", [
    ("llama", dict(targets="all-linear", use_dora=True)),
    ("qwen3_moe", dict(targets=["q", "v", "gate", "up", "down"], experts="per_expert")),
])
def test_sharded_adapters_start_and_merge_as_on_one_device(family, lora, one_process_group, tmp_path):
    """The adapters made on meta and filled after sharding equal those `apply_lora` draws on a
    loaded model (same seed), DoRA magnitudes and per-expert adapters included; and the merged
    export equals the one-device merge."""
    import copy

    from safetensors.torch import load_file

    from tunewright.models import load_pretrained, save_pretrained
    from tunewright.modules.peft.apply import adapter_state_dict, apply_lora, merge_lora
    from tunewright.training.parallel import build_meta_model, materialize, shard_fsdp2
    from tunewright.training.sharded_io import (adapter_param_names, full_tensor, init_adapters, load_full_into,
                                                load_hf_sharded, save_pretrained_sharded)
    from tunewright.training.tiny_assets import tiny_asset

    path = tiny_asset(family)
    torch.manual_seed(3)
    reference = load_pretrained(path)
    apply_lora(reference, rank=4, **lora)
    want = adapter_state_dict(reference)
    after = torch.rand(3)  # where the RNG stands once the adapters are drawn

    torch.manual_seed(3)
    model, _ = build_meta_model({"_component_": "tunewright.models.load_pretrained", "path": str(path)},
                                torch.float32)
    rng = torch.get_rng_state()
    adapted = apply_lora(model, rank=4, **lora)
    skeleton = copy.deepcopy(model)
    shard_fsdp2(model, one_process_group["dp"])
    materialize(model, torch.device("cpu"))
    load_hf_sharded(model, path, dtype=torch.float32)
    init_adapters(model, adapted, rng)
    assert torch.equal(torch.rand(3), after)
    params = dict(model.named_parameters())
    assert adapter_param_names(model) == set(want)
    for name, value in want.items():
        assert torch.equal(full_tensor(params[name]), value), name

    # B = 0 at the start makes any merge look right: give every B the same values on both sides.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(n for n in want if "lora_b" in n):
            value = torch.randn(want[name].shape, generator=gen) * 0.1
            reference.get_parameter(name).copy_(value)
            load_full_into(model, name, value)
    single = save_pretrained(merge_lora(reference), tmp_path / "single")
    sharded = save_pretrained_sharded(model, skeleton, tmp_path / "sharded", merge=True)
    got, expected = load_file(str(sharded / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_qlora_layer_that_cannot_be_sharded_is_named():
    pytest.importorskip("torchao")
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4
    from tunewright.training.parallel import build_meta_model, check_nf4_shardable
    from tunewright.training.tiny_assets import tiny_asset

    class Dim:  # a mesh dimension of the given size; no process group needed
        def __init__(self, n: int) -> None:
            self.n = n

        def size(self) -> int:
            return self.n

    model, _ = build_meta_model({"_component_": "tunewright.models.load_pretrained",
                                 "path": str(tiny_asset("llama"))}, torch.float32)
    apply_lora(model, targets=["q", "gate"], rank=4)
    quantize_base_nf4(model)
    check_nf4_shardable(model, {"dp": Dim(1), "tp": Dim(1)})
    # q_proj [128, 128] has one block of NF4 scales, gate_proj [256, 128] two.
    with pytest.raises(ValueError, match=r"QLoRA over 2 processes: the NF4 weight of layers\.0\.attn\.q_proj"):
        check_nf4_shardable(model, {"dp": Dim(2), "tp": Dim(1)})
    with pytest.raises(ValueError, match="tensor_parallel_dim > 1 is not supported"):
        check_nf4_shardable(model, {"dp": Dim(1), "tp": Dim(2)})


@pytest.mark.slow
def test_tune_run_with_torchrun_flags_runs_the_distributed_recipe(tmp_path, single_lora):
    """The README's command, through the `tune` console script: flags before RECIPE go to
    torchrun, the shipped config is found by name, and the 2 workers train like one device."""
    tune = Path(sys.executable).parent / "tune"
    out = tmp_path / "run"
    cmd = [str(tune), "run", "--nproc_per_node", "2", "--nnodes", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", "lora_finetune_distributed",
           "--config", "llama/tiny_lora_distributed", f"output_dir={out}", "batch_size=2", *COMMON,
           *NO_SAVES]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_losses(out, single_lora)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
