"""LoftQ against the paper's algorithm (Li et al. 2023, Algorithm 1) written here with torchao's
NF4 and PEFT's `_low_rank_decomposition` (PEFT's own `loftq_init` needs bitsandbytes on CUDA).

PEFT's loop: res = W; repeat T: Q = dequant(nf4(res)); L, R = svd_r(W - Q); res = W - L R.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchao")

from tunewright.models.args import ModelArgs  # noqa: E402
from tunewright.models.builder import init_weights  # noqa: E402
from tunewright.models.pretrained import build_model  # noqa: E402
from tunewright.modules.peft.apply import apply_lora  # noqa: E402
from tunewright.modules.peft.loftq import apply_loftq, loftq_init  # noqa: E402
from tunewright.modules.peft.nf4 import is_nf4, nf4_module  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))


def reference_loftq(w: torch.Tensor, rank: int, num_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized Q, A, B) as PEFT's loftq_init computes them, with QLoRA's NF4 (block 64,
    scales double-quantized in blocks of gcd(num_blocks, 256))."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    nf4 = nf4_module()
    res = w.clone()
    for _ in range(num_iter):
        q = nf4.to_nf4(res, 64, math.gcd(res.numel() // 64, 256)).get_original_weight()
        out = _low_rank_decomposition(w - q, reduced_rank=rank)
        res = w - out["L"] @ out["R"]
    return q, out["R"], out["L"]


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_init_equals_the_algorithm(num_iter):
    pytest.importorskip("peft")
    q, left, right = loftq_init(W, rank=8, num_iter=num_iter)
    want_q, want_a, want_b = reference_loftq(W, 8, num_iter)
    assert is_nf4(q)
    assert torch.equal(q.get_original_weight(), want_q)
    torch.testing.assert_close(right, want_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, want_b, rtol=0, atol=1e-5)


def test_quantization_error_falls_with_each_iteration():
    qlora = (W - nf4_module().to_nf4(W, 64, 128).get_original_weight()).norm().item()  # B = 0
    errors = []
    for num_iter in range(1, 6):
        q, left, right = loftq_init(W, rank=8, num_iter=num_iter)
        errors.append((W - (q.get_original_weight() + left @ right)).norm().item())
    assert errors[0] < qlora
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def _tiny(**lora):
    args = ModelArgs(family="llama", vocab_size=96, dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_dim=128)
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    apply_lora(model, targets="all-linear", **lora)
    return model


def test_apply_loftq_sets_nf4_base_and_scaled_adapters():
    pytest.importorskip("peft")
    model = _tiny(rank=4, alpha=16.0)  # scale 4: the adapters carry L R / sqrt(4) each
    layer = model.layers[0].mlp.down_proj
    w = layer.weight.detach().clone()
    assert apply_loftq(model, num_iter=2) == 7
    want_q, want_a, want_b = reference_loftq(w, 4, 2)
    assert is_nf4(layer.weight) and not layer.weight.requires_grad
    assert torch.equal(layer.base_weight(), want_q)
    torch.testing.assert_close(layer.lora_a.weight, want_a / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_b.weight, want_b / 2, rtol=0, atol=1e-5)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ (want_q + want_b @ want_a).T, rtol=0, atol=1e-4)


def _cfg(**over):
    keys = dict(lora_rank=4, lora_targets="all-linear", lora_alpha=8.0, lora_dropout=0.0, use_rslora=False,
                use_dora=False, lora_experts=None, quantize_base=True, init_lora_weights="loftq",
                loftq_iter=1, save_adapter=True)
    return SimpleNamespace(**{**keys, **over})


def test_bad_inputs_are_one_line():
    from tunewright.training.lora_setup import add_lora

    args = ModelArgs(family="llama", vocab_size=96, dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_dim=128)
    with pytest.raises(ValueError, match="set quantize_base: true") as e:
        add_lora(build_model(args, device="cpu"), cfg=_cfg(quantize_base=False))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not loaded: meta device"):
        add_lora(build_model(args, device="meta"), cfg=_cfg())
    with pytest.raises(ValueError, match="use_dora"):
        add_lora(build_model(args, device="cpu"), cfg=_cfg(use_dora=True))


def test_loftq_model_is_closer_to_the_dense_model_than_qlora():
    from tunewright.modules.peft.qlora import quantize_base_nf4

    dense, qlora, loftq = _tiny(rank=8, alpha=16.0), _tiny(rank=8, alpha=16.0), _tiny(rank=8, alpha=16.0)
    quantize_base_nf4(qlora)
    apply_loftq(loftq, num_iter=3)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(tokens)
        err_qlora = (qlora(tokens) - want).norm().item()
        err_loftq = (loftq(tokens) - want).norm().item()
    print(f"logit error vs dense: qlora {err_qlora:.4f}, loftq {err_loftq:.4f}")
    assert err_loftq < 0.8 * err_qlora, (err_loftq, err_qlora)


def test_loftq_recipe_trains_and_exports_merged(tmp_path):
    from tunewright.training.entry import run_recipe_file

    out = tmp_path / "run"
    history = run_recipe_file(REPO / "recipes" / "sft.py", REPO / "configs" / "llama" / "tiny_lora.yaml",
                              [f"output_dir={out}", "max_steps=4", "batch_size=4", "eval_every_n_steps=null",
                               "progress_bar=false", "num_threads=1", "save_every_n_steps=null",
                               "quantize_base=true", "init_lora_weights=loftq", "loftq_iter=2", "save_final_model=null"])
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "merged").is_dir() and not (out / "adapter").exists()
