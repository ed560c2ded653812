"""Mixed precision (training/precision.py): weights that train and their optimizer state in
fp32, frozen weights and matmuls in bf16; against transformers under the same autocast, and
against what pure bf16 loses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tunewright.models import load_pretrained
from tunewright.modules.peft.apply import apply_lora
from tunewright.training.entry import run_recipe_file
from tunewright.training.precision import Precision
from tunewright.training.tiny_assets import tiny_asset

from tests.faults import crash_at_step

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft.py"
FAST = ["batch_size=4", "eval_every_n_steps=null", "progress_bar=false", "num_threads=1",
        "save_every_n_steps=null", "save_final_model=false"]


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(seed))


def _linear_output_dtypes(model: nn.Module, tokens: torch.Tensor) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


def test_lora_mixed_precision_keeps_adapters_fp32_and_computes_in_bf16():
    model = load_pretrained(tiny_asset("llama"), dtype="bf16")
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    raised = Precision("bf16", "fp32").apply(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert raised == len(trainable) > 0
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    # Every matmul, the adapters' included, ran in bf16.
    assert _linear_output_dtypes(model, _tokens()) == {torch.bfloat16}

    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    model(_tokens()).float().logsumexp(-1).mean().backward()
    assert {p.grad.dtype for p in trainable.values()} == {torch.float32}
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if t.ndim > 0]
    assert states and {t.dtype for t in states} == {torch.float32}


def test_full_mixed_precision_logits_match_transformers_under_autocast():
    """Our fp32 model under our mixed precision = transformers' fp32 model under
    torch.autocast(bf16) (what Trainer's bf16=True does), to bf16 rounding; both far from
    where a wrong policy (all-fp32, or bf16 weights everywhere) would put them."""
    transformers = pytest.importorskip("transformers")
    path = tiny_asset("llama")
    ours = load_pretrained(path, dtype="fp32")
    Precision("bf16", "fp32").apply(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = _tokens(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = hf(tokens).logits.float()
    with torch.no_grad():
        got = ours(tokens).float()
        fp32 = hf(tokens).logits
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert (got - want).abs().max().item() <= 2e-2
    assert (fp32 - want).abs().max().item() > 1e-3  # the comparison can tell bf16 from fp32


@pytest.mark.parametrize("master,moves", [("fp32", True), ("bf16", False)])
def test_small_updates_survive_only_in_fp32_master_weights(master, moves):
    model = load_pretrained(tiny_asset("llama"), dtype="bf16")
    Precision("bf16", master).apply(model)
    norm = model.norm.weight  # RMSNorm gains: ones, where bf16's step is 2^-7
    before = norm.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    norm.grad = torch.ones_like(norm)  # an update of 1e-3 per step, under half bf16's step
    opt.step()
    assert norm.dtype == (torch.float32 if master == "fp32" else torch.bfloat16)
    assert bool((norm.detach().float() != before.float()).all()) is moves


def test_precision_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="fp16 training needs loss scaling"):
        Precision("fp16")
    with pytest.raises(ValueError, match="master_dtype: bf16 with dtype: fp32"):
        Precision("fp32", "bf16")
    assert not Precision("fp32", "fp32").mixed
    assert Precision("bf16", "bf16").fsdp_policy() is None


def test_mixed_precision_recipe_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """LoRA under bf16 compute + fp32 adapters through the recipe: it logs its policy, the loss
    falls, and a run killed after the step-4 checkpoint resumes to the uninterrupted losses."""
    config = REPO / "configs" / "llama" / "tiny_lora.yaml"
    common = ["dtype=bf16", "max_steps=8", *[o for o in FAST if not o.startswith("save_every")],
              "save_every_n_steps=4"]
    straight = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}/straight", *common])
    assert straight[-1]["loss"] < straight[0]["loss"]
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}/resumed", *common])
    resumed = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}/resumed", *common,
                                               "resume_from_checkpoint=auto"])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]


def test_recipe_prints_its_precision(tmp_path, capsys):
    config = REPO / "configs" / "llama" / "tiny_lora.yaml"
    run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}", "max_steps=1", "dtype=bf16", *FAST])
    assert "precision: bf16 compute, fp32 weights that train and optimizer state" in capsys.readouterr().out


def test_fsdp2_mixed_precision_policy_in_one_process(tmp_path):
    """Under FSDP2 the policy is MixedPrecisionPolicy (fp32 shards gathered in bf16), not
    autocast: the adapters it writes are fp32 (bf16 with master_dtype: bf16) and its losses are
    the one-device mixed-precision losses to bf16 rounding."""
    from safetensors.torch import load_file

    def adapter_dtypes(out: Path) -> set[torch.dtype]:
        return {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()}

    common = ["dtype=bf16", "max_steps=4", *FAST]
    one = run_recipe_file(RECIPE, REPO / "configs" / "llama" / "tiny_lora.yaml",
                          [f"output_dir={tmp_path}/one", *common])
    sharded_config = REPO / "configs" / "llama" / "tiny_lora_distributed.yaml"
    fsdp = run_recipe_file(RECIPE, sharded_config, [f"output_dir={tmp_path}/fsdp", *common])
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], rel=2e-2)
    assert adapter_dtypes(tmp_path / "one") == adapter_dtypes(tmp_path / "fsdp") == {torch.float32}
    run_recipe_file(RECIPE, sharded_config, [f"output_dir={tmp_path}/pure", *common, "master_dtype=bf16",
                                             "max_steps=1"])
    assert adapter_dtypes(tmp_path / "pure") == {torch.bfloat16}


def test_experts_take_the_grouped_kernel_under_autocast(monkeypatch):
    """fp32 master expert weights under bf16 autocast: one grouped bf16 matmul (not the
    per-expert loop that reads split sizes back to the host), equal to the loop on bf16 copies."""
    from tunewright.modules import moe

    x = torch.randn(40, 32)
    weight = torch.randn(4, 16, 32)
    counts = torch.tensor([10, 0, 25, 5])
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe.grouped_linear(x, weight, counts)
    assert calls and got.dtype == torch.bfloat16
    xb, wb = x.bfloat16(), weight.bfloat16()
    want = torch.cat([c @ wb[e].t() for e, c in enumerate(xb.split(counts.tolist()))])
    assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_deterministic_runs_with_deterministic_kernels_and_restores_the_setting(tmp_path, monkeypatch):
    from tunewright.training import optim

    seen = []
    real = optim.optimizer_step
    monkeypatch.setattr(optim, "optimizer_step",
                        lambda *a, **k: seen.append(torch.are_deterministic_algorithms_enabled()) or real(*a, **k))
    config = REPO / "configs" / "llama" / "tiny_lora.yaml"
    plain = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}/a", "max_steps=2", *FAST])
    strict = run_recipe_file(RECIPE, config, [f"output_dir={tmp_path}/b", "max_steps=2", "deterministic=true", *FAST])
    assert seen == [False, False, True, True]
    assert not torch.are_deterministic_algorithms_enabled()
    assert [r["loss"] for r in strict] == [r["loss"] for r in plain]  # CPU kernels: already deterministic
