"""Activation offloading, optimizer-in-backward and `compile: true` in the inference recipes,
each against the run without it: offloading gives bit-identical losses on CPU (its hooks run
but tensors stay), optimizer-in-backward gives the losses of one AdamW over all weights and
resumes exactly, compiled generation/evaluation give the eager tokens and loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunewright.training.offload as offload_module
from tests.faults import crash_at_step
from tunewright.training.entry import run_recipe_file
from tunewright.training.offload import OffloadActivations, activation_offloading, wants_offload
from tunewright.training.optim_in_backward import OptimizerInBackward

REPO = Path(__file__).resolve().parent.parent
FULL = LORA = REPO / "recipes" / "sft.py"
FULL_CFG = REPO / "configs" / "llama" / "tiny_full.yaml"
LORA_CFG = REPO / "configs" / "llama" / "tiny_lora.yaml"
FAST = ["batch_size=4", "eval_every_n_steps=null", "progress_bar=false", "num_threads=1",
        "save_every_n_steps=null", "save_final_model=false"]


def run(recipe: Path, config: Path, out: Path, *extra: str) -> list[dict]:
    return run_recipe_file(recipe, config, [f"output_dir={out}", *FAST, *extra])


def tiny_model_and_batch(device: str = "cpu") -> tuple[torch.nn.Module, torch.Tensor]:
    from tunewright.models import load_pretrained
    from tunewright.training.tiny_assets import tiny_asset

    torch.manual_seed(0)
    model = load_pretrained(tiny_asset("llama")).to(device)
    return model, torch.randint(0, 288, (2, 48), device=device)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


# ---------------------------------------------------------------------------- offloading
@pytest.fixture
def offload_spy(monkeypatch) -> list[OffloadActivations]:
    """The offloading contexts the recipe's loop opened, to see that its hooks really ran."""
    opened: list[OffloadActivations] = []

    def spy(enabled: bool, **options):
        ctx = activation_offloading(enabled, **options)
        if isinstance(ctx, OffloadActivations):
            opened.append(ctx)
        return ctx

    monkeypatch.setattr(offload_module, "activation_offloading", spy)
    return opened


@pytest.mark.parametrize("recipe, config", [(FULL, FULL_CFG), (LORA, LORA_CFG)], ids=["full", "lora"])
def test_offloading_gives_identical_losses(tmp_path, offload_spy, recipe, config):
    plain = run(recipe, config, tmp_path / "plain", "max_steps=3")
    assert not offload_spy
    offloaded = run(recipe, config, tmp_path / "offload", "max_steps=3", "enable_activation_offloading=true")
    assert [r["loss"] for r in offloaded] == [r["loss"] for r in plain]  # bit-identical on CPU
    assert len(offload_spy) == 3  # one context per micro-batch, each used by forward and backward
    assert all(c.num_packed > 0 and c.num_unpacked > 0 and c.num_offloaded == 0 for c in offload_spy)


def test_offloading_with_checkpointing_saves_only_block_inputs(tmp_path, offload_spy):
    plain = run(FULL, FULL_CFG, tmp_path / "a", "max_steps=2", "enable_activation_offloading=true")
    saved_plain = offload_spy[0].num_packed
    offload_spy.clear()
    ckpt = run(FULL, FULL_CFG, tmp_path / "b", "max_steps=2", "enable_activation_checkpointing=true")
    both = run(FULL, FULL_CFG, tmp_path / "c", "max_steps=2", "enable_activation_checkpointing=true",
               "enable_activation_offloading=true")
    assert [r["loss"] for r in both] == [r["loss"] for r in ckpt]
    assert [r["loss"] for r in both] == pytest.approx([r["loss"] for r in plain], abs=1e-6)
    # Inside checkpointed blocks the checkpoint's own hooks keep nothing: far fewer tensors
    # reach ours, and every one of them is brought back for the recomputation.
    assert 0 < offload_spy[0].num_packed < saved_plain / 3
    assert offload_spy[0].num_unpacked == offload_spy[0].num_packed


def test_hooks_see_every_saved_tensor_and_leave_cpu_tensors_untouched():
    model, tokens = tiny_model_and_batch()
    reference = {"pack": 0, "unpack": 0}

    def count(kind):
        def hook(x):
            reference[kind] += 1
            return x
        return hook

    with torch.autograd.graph.saved_tensors_hooks(count("pack"), count("unpack")):
        loss_of(model, tokens).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    with OffloadActivations(min_bytes=0) as ctx:
        loss = loss_of(model, tokens)
    loss.backward()
    assert (ctx.num_packed, ctx.num_unpacked) == (reference["pack"], reference["unpack"])
    assert ctx.num_offloaded == 0 and ctx.bytes_offloaded == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))

    class Keep(torch.autograd.Function):
        """Saves its input; backward checks it gets back the same memory, not a copy."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.original = x
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (saved,) = ctx.saved_tensors
            assert saved.data_ptr() == ctx.original.data_ptr() and saved.device == ctx.original.device
            return grad * 2

    x = torch.randn(64, 64, requires_grad=True)
    with OffloadActivations(min_bytes=0) as ctx:
        y = Keep.apply(x * 1.0)
    y.sum().backward()
    assert ctx.num_unpacked == ctx.num_packed >= 1 and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_which_tensors_would_move():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    activation = torch.randn(64, 64)
    assert wants_offload(activation, 1024)
    assert not wants_offload(activation, 64 * 64 * 4 + 1)  # below the threshold
    assert not wants_offload(weight, 0) and not wants_offload(weight.t(), 0)  # weights stay
    assert not wants_offload(torch.randn(64, 1).expand(64, 4096), 0)  # would grow on the CPU
    assert wants_offload(activation[:32], 0)


def test_the_fused_losss_head_gradient_is_never_offered_for_offloading():
    """The fused cross-entropy computes the head's gradient (vocab x dim, fp32) in forward:
    a gradient, not an activation, so offloading must never see it (it would cross PCIe twice
    per step). The hooks record every tensor saved under them; on the CPU nothing moves, which
    is what lets this run anywhere."""
    from tunewright.training.objectives import causal_lm_loss

    model, tokens = tiny_model_and_batch()
    vocab, dim = model.tok_embeddings.weight.shape
    seen: list[tuple[int, ...]] = []

    class Recording(OffloadActivations):
        def _pack(self, t):
            seen.append(tuple(t.shape))
            return super()._pack(t)

    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "seq_lens": [tokens.shape[1]] * 2}
    with Recording(min_bytes=0):
        loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    assert seen and (vocab, dim) not in seen and all(vocab not in shape for shape in seen), seen[-5:]
    assert model.tok_embeddings.weight.grad is not None  # the head's gradient arrived all the same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves tensors on CUDA only")
def test_cuda_offloading_frees_gpu_memory_and_keeps_gradients():
    model, tokens = tiny_model_and_batch("cuda")
    tokens = torch.randint(0, 288, (8, 512), device="cuda")  # activations dominate the weights
    loss_of(model, tokens).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    def held_after_forward(ctx) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with ctx:
            loss = loss_of(model, tokens)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before, loss

    held_plain, loss = held_after_forward(activation_offloading(False))
    loss.backward()
    model.zero_grad(set_to_none=True)
    ctx = OffloadActivations()
    held_offloaded, loss = held_after_forward(ctx)
    loss.backward()
    assert ctx.num_offloaded > 0 and ctx.num_unpacked == ctx.num_packed
    assert held_offloaded < 0.5 * held_plain
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))


# ---------------------------------------------------------------------------- optimizer in backward
OIB = ["clip_grad_norm=null", "optimizer_in_backward=true"]


def test_optimizer_in_backward_matches_one_optimizer(tmp_path):
    plain = run(FULL, FULL_CFG, tmp_path / "plain", "max_steps=6", "clip_grad_norm=null")
    oib = run(FULL, FULL_CFG, tmp_path / "oib", "max_steps=6", *OIB)
    assert [r["loss"] for r in oib] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert [r["lr"] for r in oib] == [r["lr"] for r in plain]  # the schedule drives every weight
    assert plain[-1]["loss"] < plain[0]["loss"] - 0.3


def test_optimizer_in_backward_resumes_exactly(tmp_path, monkeypatch):
    common = ["max_steps=8", "save_every_n_steps=4", *OIB]
    straight = run(FULL, FULL_CFG, tmp_path / "straight", *common)

    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)  # right after the step-4 checkpoint
        with pytest.raises(KeyboardInterrupt):
            run(FULL, FULL_CFG, tmp_path / "resumed", *common)
    resumed = run(FULL, FULL_CFG, tmp_path / "resumed", *common, "resume_from_checkpoint=auto")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in straight]


@pytest.mark.parametrize("extra, key", [
    (["optimizer_in_backward=true"], "clip_grad_norm"),
    (["optimizer_in_backward=true", "clip_grad_norm=null", "gradient_accumulation_steps=2"],
     "gradient_accumulation_steps"),
])
def test_optimizer_in_backward_refuses_what_needs_all_gradients(tmp_path, extra, key):
    with pytest.raises(ValueError, match=key) as err:
        run(FULL, FULL_CFG, tmp_path / "x", "max_steps=1", *extra)
    assert "\n" not in str(err.value) and not (tmp_path / "x" / "metrics.jsonl").exists()


def test_gradients_never_all_exist_and_the_update_is_adamw():
    from torch.optim.lr_scheduler import LambdaLR

    model, tokens = tiny_model_and_batch()
    reference, _ = tiny_model_and_batch()
    params = list(model.parameters())
    opt = OptimizerInBackward(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    schedule = LambdaLR(opt, lambda step: 1.0 / (1 + step))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_schedule = LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))

    most = {"grads": 0}

    def before_accumulation(grad):
        most["grads"] = max(most["grads"], sum(p.grad is not None for p in params))
        return grad

    for p in params:
        p.register_hook(before_accumulation)
    for _ in range(3):
        loss_of(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        loss_of(reference, tokens).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_schedule.step()
    assert most["grads"] == 0  # each gradient is gone before the next one lands
    assert all(p.grad is None for p in params)
    for p, q in zip(params, reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # Loaded state gives the inner optimizers new groups; the scheduler must still reach them.
    state = opt.state_dict()
    fresh = OptimizerInBackward(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    fresh_schedule = LambdaLR(fresh, lambda step: 1.0 / (1 + step))
    fresh.load_state_dict(state)
    fresh_schedule.load_state_dict(schedule.state_dict())
    fresh_schedule.step()
    assert all(g["lr"] == pytest.approx(1e-2 / 5) for o in fresh.optimizers for g in o.param_groups)
    assert fresh.optimizers[0].state[params[0]]["step"] == 3
    opt.remove_hooks()
    fresh.remove_hooks()


# ---------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_generation_gives_the_same_tokens():
    from torch._dynamo.utils import counters

    generate = REPO / "recipes" / "generate.py"
    config = REPO / "configs" / "llama" / "tiny_generate.yaml"
    common = ["num_threads=1", "max_new_tokens=8"]
    eager = run_recipe_file(generate, config, common)
    torch._dynamo.reset()
    counters.clear()
    compiled = run_recipe_file(generate, config, [*common, "compile=true"])
    assert compiled["ids"] == eager["ids"] and len(eager["ids"]) == 8
    assert 1 <= counters["stats"]["unique_graphs"] <= 3  # prefill + decode step, not one per token


@pytest.mark.slow
def test_compiled_evaluation_gives_the_same_loss(tmp_path):
    from torch._dynamo.utils import counters

    evaluate = REPO / "recipes" / "evaluate.py"
    config = REPO / "configs" / "llama" / "tiny_evaluate.yaml"
    common = ["num_threads=1", "max_answers=2", "max_new_tokens=4"]
    eager = run_recipe_file(evaluate, config, [f"output_dir={tmp_path / 'a'}", *common])
    torch._dynamo.reset()
    counters.clear()
    compiled = run_recipe_file(evaluate, config, [f"output_dir={tmp_path / 'b'}", *common, "compile=true"])
    # The loss's padded batches compile once, then once more with a dynamic length; replies
    # are decoded eagerly.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["num_targets"] == eager["num_targets"]
    predictions = [(tmp_path / d / "predictions.jsonl").read_text() for d in ("a", "b")]
    assert predictions[0] == predictions[1]
