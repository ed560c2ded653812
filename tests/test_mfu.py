"""MFU: FLOPs per token against a hand count from the model's shape and against torch's own
FlopCounterMode over a real forward and backward; datasheet peaks; `mfu` in metrics and bar."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tunewright.models.builder import init_weights
from tunewright.models.pretrained import build_model
from tunewright.models.registry import get_family
from tunewright.modules.peft.apply import apply_lora
from tunewright.training import mfu as mfu_module
from tunewright.training.mfu import MFU, PEAK_ENV, flops_per_token, gpu_peak_flops
from tunewright.training.run import Run
from tunewright.training.state import TrainState

T = 32  # tokens of the measured forward/backward


def tiny(family: str = "llama", **changes):
    args = dataclasses.replace(get_family(family).tiny, **changes)
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    return model, args


def hand_weights(a) -> dict[str, int]:
    """Matmul weight entries per block and of the head, from the shape alone."""
    hd = a.head_dim or a.dim // a.num_heads
    return {"q": a.dim * a.num_heads * hd, "k": a.dim * a.num_kv_heads * hd, "v": a.dim * a.num_kv_heads * hd,
            "o": a.num_heads * hd * a.dim, "mlp": 3 * a.dim * a.intermediate_dim, "head": a.vocab_size * a.dim}


def measured(model, *, backward: bool = True) -> float:
    """torch's count of matmul FLOPs per token over one forward (and backward) of T tokens."""
    tokens = torch.randint(0, 200, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        if backward:
            model(tokens).sum().backward()
        else:
            with torch.no_grad():
                model(tokens)
    return counter.get_total_flops() / T


@pytest.mark.parametrize("tied", [False, True])
def test_full_training_is_6n(tied):
    model, a = tiny(tie_embeddings=tied)
    w = hand_weights(a)
    n = a.num_layers * (w["q"] + w["k"] + w["v"] + w["o"] + w["mlp"]) + w["head"]  # no embedding lookup
    assert flops_per_token([model]) == 6 * n
    assert measured(model) == 6 * n


def test_frozen_model_is_2n_forward_only():
    model, a = tiny()
    model.requires_grad_(False)  # a reference or teacher model
    w = hand_weights(a)
    n = a.num_layers * (w["q"] + w["k"] + w["v"] + w["o"] + w["mlp"]) + w["head"]
    assert flops_per_token([model]) == 2 * n == measured(model, backward=False)


def test_lora_frozen_weights_cost_4n_adapters_6n():
    model, a = tiny()
    rank = 4
    apply_lora(model, targets=["q", "v"], rank=rank)
    w = hand_weights(a)
    hd = a.dim // a.num_heads
    base = a.num_layers * (w["q"] + w["k"] + w["v"] + w["o"] + w["mlp"]) + w["head"]
    adapters = a.num_layers * rank * ((a.dim + a.num_heads * hd) + (a.dim + a.num_kv_heads * hd))
    assert flops_per_token([model]) == 6 * adapters + 4 * base
    # Autograd skips the input gradient of the first block's q/k/v and adapter-A weights (they
    # read the frozen embeddings): the documented upper bound is off by exactly their 2n.
    first_block_reads_embeddings = w["q"] + w["k"] + w["v"] + rank * a.dim * 2
    assert measured(model) == 6 * adapters + 4 * base - 2 * first_block_reads_embeddings


def test_qlora_counts_its_nf4_base_like_lora():
    pytest.importorskip("torchao")
    from tunewright.modules.peft.qlora import quantize_base_nf4

    model, _ = tiny()
    apply_lora(model, targets=["q", "v"], rank=4)
    lora = flops_per_token([model])
    quantize_base_nf4(model)  # 4-bit storage, the same matmuls
    assert flops_per_token([model]) == lora


def test_moe_counts_the_experts_a_token_visits(monkeypatch):
    # FlopCounterMode does not see torch._grouped_mm: the per-expert matmul path it does see.
    monkeypatch.setattr("tunewright.modules.moe._grouped_mm_ok", lambda x, w: False)
    model, a = tiny("qwen3_moe")
    w = hand_weights(a)
    attention = w["q"] + w["k"] + w["v"] + w["o"]
    moe_layers = a.num_layers - len(a.dense_layers)
    experts = a.experts_per_token * 3 * a.dim * a.expert_dim
    n = (a.num_layers * attention + len(a.dense_layers) * w["mlp"]
         + moe_layers * (a.dim * a.num_experts + experts) + w["head"])  # router: dim x E
    assert flops_per_token([model]) == 6 * n == measured(model)


def test_attention_term_is_palms_12_l_d_t():
    model, a = tiny()
    hd = a.head_dim or a.dim // a.num_heads
    assert flops_per_token([model], seq_len=512) - flops_per_token([model]) == 12 * a.num_layers * a.num_heads * hd * 512
    model.requires_grad_(False)
    assert flops_per_token([model], seq_len=512) - flops_per_token([model]) == 4 * a.num_layers * a.num_heads * hd * 512


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),  # SXM
    ("NVIDIA H100 PCIe", "bf16", True, 756.0),
    ("NVIDIA H200", "bf16", True, 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),  # TF32 tensor cores
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
    ("NVIDIA L4", "bf16", True, 121.0),
    ("NVIDIA GeForce RTX 4090", "fp16", True, 165.2),
])
def test_datasheet_peaks(name, dtype, tf32, tflops):
    assert gpu_peak_flops(name, dtype, tf32) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak():
    assert gpu_peak_flops("NVIDIA L40S", "bf16", True) is None  # not an L4


def test_cpu_peak_is_measured_once():
    first = mfu_module.cpu_peak_flops("fp32", 1)
    assert first > 1e8  # any CPU of this century does 0.1 GFLOP/s
    assert mfu_module.cpu_peak_flops("fp32", 1) is first  # cached


def test_metrics_and_bar_show_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "0.5")  # a known peak: 0.5 TFLOP/s
    shown = []
    monkeypatch.setattr("tunewright.training.progress._Bar.show", lambda self, **values: shown.append(values))
    model, a = tiny()
    w = hand_weights(a)
    per_token = 6 * (a.num_layers * (w["q"] + w["k"] + w["v"] + w["o"] + w["mlp"]) + w["head"])
    run = Run(tmp_path, progress_bar=True)
    run.resume(TrainState(model=model))
    for _ in run.steps(2):
        run.log(loss=1.0, num_tokens=100)
    run.close()
    for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()):
        assert record["mfu"] == pytest.approx(record["tokens_per_second"] * per_token / 0.5e12, rel=1e-12)
        assert shown.pop(0)["mfu"] == f"{100 * record['mfu']:.1f}%"


def test_bad_peak_override_is_one_line(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "lots")
    with pytest.raises(ValueError, match=f"^{PEAK_ENV}='lots' must be a number of TFLOP/s$"):
        MFU([tiny()[0]])
