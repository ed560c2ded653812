"""Tensor parallel (`training/tensor_parallel.py`) against one process.

Under torchrun (gloo, CPU; `tp_scripts/tp_equivalence.py`), a TP-2 model gives the one-process
model's logits, loss, gradients and AdamW step, to 1e-5: Llama with GQA, multi-head attention
with biases, Gemma's multi-query attention (with LoRA on its whole k/v too), Qwen3's q/k norms
with biases and a tied head, Gemma-2's soft-caps, window and sandwich norms, LoRA and DoRA,
after FSDP2 on a (1, 2) and a (2, 2) mesh, and built on the meta device then loaded. The refusals are checked in this process: they need no process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunewright.models.args import ModelArgs
from tunewright.models.pretrained import build_model
from tunewright.models.registry import all_families, get_family
from tunewright.training.tensor_parallel import (
    COLWISE, DEFAULT_TP_PLAN, ROWWISE, check_tensor_parallel, tp_plan_for,
)

SCRIPT = Path(__file__).resolve().parent / "tp_scripts" / "tp_equivalence.py"
TWO_PROCESS_CASES = ["llama_gqa", "mha_biases", "gemma_mqa", "gemma_mqa_lora", "qwen3_qk_norm_bias_tied",
                     "gemma2_softcap_window", "llama_lora", "qwen3_dora", "llama_fsdp", "qwen3_lora_fsdp",
                     "llama_meta_load"]
TOL = 1e-5
LLAMA = ModelArgs(family="llama", vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_dim=128)


def torchrun(out: Path, nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(SCRIPT), "--out", str(out / "result.json"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> dict:
    return torchrun(tmp_path_factory.mktemp("tp2"), 2)


def assert_matches_one_process(res: dict) -> None:
    for key in ("logits", "loss", "grads", "grad_norm", "params_after_step"):
        assert res[key] <= TOL, (key, res)
    assert res["local_heads"] == 2  # 4 heads split 2 ways: attention ran on its local heads
    assert res["num_sharded"] == res["num_params"]  # every parameter a DTensor on one mesh
    assert res["grads_off_layout"] == 0  # replicated weights' partial gradients summed


@pytest.mark.slow  # ~50 s on 2 busy cores, mostly two interpreters importing torch
@pytest.mark.parametrize("case", TWO_PROCESS_CASES)
def test_tp2_matches_one_process(two_process, case):
    assert_matches_one_process(two_process[case])


@pytest.mark.slow
def test_tp2_refuses_indivisible_kv_heads_on_a_real_mesh(two_process):
    assert two_process["refusal"] == ("tensor parallel size 2 must divide the attention heads: "
                                      "num_kv_heads=3 in layers.0.attn (or be 1: multi-query attention)")


@pytest.mark.slow  # ~55 s: four processes on two cores
def test_tp2_then_fsdp_over_two_data_parallel_ranks(tmp_path):
    """dp 2 x tp 2: each dp rank takes half the batch; FSDP sums gradients over dp."""
    res = torchrun(tmp_path, 4, "--dp", "2", "--cases", "llama_fsdp,qwen3_lora_fsdp")
    for case in ("llama_fsdp", "qwen3_lora_fsdp"):
        assert_matches_one_process(res[case])


# ---------------------------------------------------------------- refusals, one process
@pytest.mark.parametrize("changes, message", [
    ({"num_heads": 6, "num_kv_heads": 3, "head_dim": 16},
     "tensor parallel size 2 must divide the attention heads: num_kv_heads=3 in layers.0.attn "
     "(or be 1: multi-query attention)"),
    ({"num_heads": 3, "num_kv_heads": 1, "head_dim": 16},
     "tensor parallel size 2 must divide the attention heads: num_heads=3 in layers.0.attn"),
    ({"intermediate_dim": 129},
     "tensor parallel size 2 must divide layers.0.mlp.gate_proj.out_features=129"),
])
def test_refuses_what_does_not_split(changes, message):
    model = build_model(LLAMA.replace(**changes), device="meta")
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(model, 2)
    assert str(err.value) == message


def test_refuses_mixture_of_experts():
    model = build_model(get_family("mixtral").tiny, device="meta")
    with pytest.raises(ValueError, match=r"does not support mixture-of-experts layers \(layers.0.mlp\)"):
        check_tensor_parallel(model, 2)


def test_refuses_a_plan_that_splits_attention_halfway():
    model = build_model(LLAMA, device="meta")
    plan = {**DEFAULT_TP_PLAN, "attn.o_proj": COLWISE}
    with pytest.raises(ValueError, match="layers.0.attn must shard q_proj/k_proj/v_proj colwise and o_proj rowwise"):
        check_tensor_parallel(model, 2, plan)
    with pytest.raises(ValueError, match="unknown style 'sideways'"):
        check_tensor_parallel(model, 2, {**DEFAULT_TP_PLAN, "mlp.up_proj": "sideways"})


def test_refuses_nf4_base_weights():
    pytest.importorskip("torchao")
    from tunewright.models.builder import init_weights
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4

    model = build_model(LLAMA.replace(dim=128, intermediate_dim=256), device="cpu")
    init_weights(model, seed=0)
    apply_lora(model, targets=["q", "v"], rank=4, alpha=8.0)
    quantize_base_nf4(model)
    with pytest.raises(ValueError, match=r"does not support NF4-quantized \(QLoRA\) base weights"):
        check_tensor_parallel(model, 2)


# ---------------------------------------------------------------- the plan is family data
@pytest.mark.parametrize("family", [f.name for f in all_families() if f.tiny is not None])
def test_every_family_splits_two_ways_with_every_block_linear_sharded(family):
    """Each family's tiny model passes the checks, and its plan shards every linear layer of
    every block (a family with a linear the plan misses would silently keep it whole), or the
    family is refused as a mixture of experts."""
    args = get_family(family).tiny
    model = build_model(args, device="meta")
    if args.num_experts:
        with pytest.raises(ValueError, match="mixture-of-experts"):
            check_tensor_parallel(model, 2)
        return
    check_tensor_parallel(model, 2)
    plan = tp_plan_for(model)
    sharded = {path for path, style in plan.items() if style in (COLWISE, ROWWISE)}
    for block in model.layers:
        linears = {name for name, m in block.named_modules() if type(m).__name__ == "Linear"}
        assert linears == sharded


def test_a_family_plan_replaces_the_default(monkeypatch):
    model = build_model(LLAMA, device="meta")
    own = {k: v for k, v in DEFAULT_TP_PLAN.items() if not k.startswith("mlp.")}  # MLP kept whole
    monkeypatch.setattr(get_family("llama"), "tp_plan", own)
    assert tp_plan_for(model) == own
    assert ROWWISE not in {v for k, v in tp_plan_for(model).items() if k.startswith("mlp.")}
