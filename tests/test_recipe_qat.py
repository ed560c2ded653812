"""QAT (recipes/sft.py with `quantization:`) and recipes/quantize.py on the tiny configs, against independent runs: the
QAT run's loss falls (full and LoRA) and its quantized export equals torchao's PTQ of its own
trained (LoRA: merged) weights
(and reloads to the held-out loss it logged); with `fake_quant_after_n_steps` the first N steps
are the sft recipe's, bit for bit; kill + resume gives the uninterrupted losses; PTQ's export
loads in `generate` and `evaluate`; bad inputs are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.faults import crash_at_step
from tunewright.training.entry import run_recipe_file

pytest.importorskip("torchao")

REPO = Path(__file__).resolve().parent.parent
QAT = SFT = REPO / "recipes" / "sft.py"  # QAT is sft with a `quantization:` node
PTQ = REPO / "recipes" / "quantize.py"
QAT_CFG, SFT_CFG = REPO / "configs" / "llama" / "tiny_qat.yaml", REPO / "configs" / "llama" / "tiny_full.yaml"
PTQ_CFG = REPO / "configs" / "llama" / "tiny_quantize.yaml"
FAST = ["eval_every_n_steps=null", "progress_bar=false", "num_threads=1", "save_every_n_steps=null", "batch_size=4"]


def metrics(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


LORA = ["lora_rank=8", "lora_alpha=16", "optimizer.lr=1e-2"]


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_qat_learns_and_exports_torchaos_quantization_of_its_trained_weights(tmp_path: Path, extra: list) -> None:
    from tunewright.models import load_pretrained
    from tunewright.training.quantize import load_quantized, quantize_ptq

    out = tmp_path / "qat"
    run_recipe_file(QAT, QAT_CFG, [f"output_dir={out}", *FAST, "max_steps=12", "eval_every_n_steps=12",
                                   "save_final_model=true", *extra])
    losses = metrics(out)
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3 - 0.3
    tokens = torch.randint(0, 288, (2, 23), generator=torch.Generator().manual_seed(1))
    # the trained weights before any rounding (with LoRA: merged into the base)
    reference = load_pretrained(out / ("merged" if extra else "final"))
    quantize_ptq(reference, {"scheme": "int8_dynamic_act_int4_weight", "group_size": 32})
    exported = load_quantized(out / "quantized", dtype="fp32")
    with torch.no_grad():
        assert torch.equal(exported(tokens), reference(tokens))

    # evaluate's held-out loss of the export = the fake-quantized val_loss the run logged
    result = run_recipe_file(REPO / "recipes" / "evaluate.py", REPO / "configs" / "llama" / "tiny_evaluate.yaml",
                             [f"output_dir={tmp_path / 'eval'}", "model._component_=tunewright.training.quantize."
                              "load_quantized", f"model.path={out / 'quantized'}", "answer_column=null"])
    assert result["loss"] == pytest.approx(metrics(out, "val_loss")[12], rel=1e-6)


@pytest.mark.parametrize("family,extra", [("qwen2", []), ("qwen2", LORA), ("llama", [])],
                         ids=["tied", "tied-lora", "untied"])
def test_first_n_steps_without_fake_quant_are_the_sft_recipes(tmp_path: Path, family: str, extra: list) -> None:
    common = [*FAST, "max_steps=4", f"model.path=${{tiny:{family}}}", *extra]
    sft = run_recipe_file(SFT, SFT_CFG, [f"output_dir={tmp_path / 'sft'}", *common])
    qat = run_recipe_file(QAT, QAT_CFG, [f"output_dir={tmp_path / 'qat'}", *common, "fake_quant_after_n_steps=2"])
    assert qat[0]["loss"] == sft[0]["loss"]
    if family == "qwen2":  # a tied head (as SmolLM2's, Llama-3.2's): the same computation
        assert [r["loss"] for r in qat[:2]] == [r["loss"] for r in sft[:2]]  # bit for bit
    else:
        # An untied head becomes torchao's FakeQuantizedLinear, which the loss cannot fuse
        # with its cross-entropy as it does a plain nn.Linear head (objectives.causal_lm_loss):
        # the same maths in another summation order, so the step-1 gradients differ in the last
        # bits and step 2's loss by ~1e-7.
        assert [r["loss"] for r in qat[:2]] == pytest.approx([r["loss"] for r in sft[:2]], rel=1e-6, abs=0)
    assert qat[2]["loss"] != pytest.approx(sft[2]["loss"], rel=1e-5)  # step 3 rounds


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path: Path, monkeypatch, extra: list) -> None:
    common = [*FAST, "max_steps=5", "save_every_n_steps=2", "fake_quant_after_n_steps=3", *extra]
    straight = tmp_path / "straight"
    run_recipe_file(QAT, QAT_CFG, [f"output_dir={straight}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 3)  # after the step-2 checkpoint, before fake quantization starts
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(QAT, QAT_CFG, [f"output_dir={resumed}", *common])
    assert sorted(metrics(resumed)) == [1, 2]
    run_recipe_file(QAT, QAT_CFG, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    assert metrics(resumed) == metrics(straight)  # bit-identical, every step once
    a, b = (_stored(run / "quantized" / "quantized.safetensors") for run in (resumed, straight))
    assert a[1] == b[1] and a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _stored(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_fsdp2_in_one_process_equals_one_device(tmp_path: Path, extra: list) -> None:
    from tunewright.training.quantize import load_quantized

    common = [*FAST, "max_steps=3", *extra]
    one = run_recipe_file(QAT, QAT_CFG, [f"output_dir={tmp_path / 'one'}", *common])
    fsdp = run_recipe_file(QAT, QAT_CFG, [f"output_dir={tmp_path / 'fsdp'}", "distributed=true", *common])
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in one], rel=1e-5), key
    gathered = tmp_path / "fsdp" / ("merged" if extra else "final") / "config.json"
    assert gathered.is_file()  # gathered, then quantized on rank 0
    tokens = torch.randint(0, 288, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = (load_quantized(tmp_path / run / "quantized")(tokens) for run in ("one", "fsdp"))
    torch.testing.assert_close(a, b, rtol=0, atol=0.05)  # float noise may flip a rounding or two


def test_ptq_export_loads_in_generate(tmp_path: Path) -> None:
    out = tmp_path / "ptq"
    result = run_recipe_file(PTQ, PTQ_CFG, [f"output_dir={out}"])
    assert result["loss_after"] != result["loss_before"]
    assert result["bytes_after"] < result["bytes_before"] / 3  # int4 in int8 bytes, embeddings too
    reply = run_recipe_file(REPO / "recipes" / "generate.py", REPO / "configs" / "llama" / "tiny_generate.yaml",
                            ["model._component_=tunewright.training.quantize.load_quantized",
                             f"model.path={out / 'quantized'}", "max_new_tokens=4"])
    assert reply is not None


@pytest.mark.parametrize("overrides,match", [
    (["quantization.scheme=int4_weight_only_cuda"], "quantization.scheme: int4_weight_only_cuda runs on CUDA only"),
    (["lora_rank=8", "quantize_base=true"], "quantize_base: QAT on a QLoRA NF4 base is not possible"),
    (["lora_rank=8", "lora_dropout=0.1"], "fake-quantizes the merged weight, which needs lora_dropout: 0"),
    (["distributed=true", "tensor_parallel_dim=2"], "tensor_parallel_dim: QAT shards with FSDP2 only"),
])
def test_bad_inputs_are_one_line(tmp_path: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        run_recipe_file(QAT, QAT_CFG, [f"output_dir={tmp_path / 'bad'}", *FAST, "max_steps=1", *overrides])
    assert "\n" not in str(e.value)
