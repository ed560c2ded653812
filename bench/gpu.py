"""Everything a first GPU session should measure, in one call (about 8 minutes on one H100).

    python bench/gpu.py                               # on the GPU: every check, full sizes
    python bench/gpu.py --device cpu --small          # the same code on tiny sizes (a CI test)
    python bench/gpu.py --only env,attention,decode   # some checks

On a lent GPU (a bare machine with torch and no registry): `bash bench/gpu_wheels.sh` here
first, then one device call with `carry=[".whl"]` and the command
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT` (timeout_s 600).

Each check runs on its own (a failure is recorded with its error and the next check runs) and
the results go to `<out>/gpu.json` and `<out>/gpu.md` (default out: out/gpu):

  env          torch / CUDA / device / kernels available
  lora_tiny    tiny LoRA in bf16 learns; padded, padding-free and packed batches agree
  attention    the kernel each family gets, and every kernel against a float64 reference
  fused_ce     fused linear cross-entropy at vocab 128k and 256k against full logits
  compile      graph and recompile count of a compiled padding-free step
  offload      activation offloading on/off: equal losses, memory saved
  qlora        NF4 base + LoRA learns; weight memory
  moe          grouped experts (torch._grouped_mm) against a per-expert loop
  torchrun     the SFT recipe under torchrun, one process (NCCL on a GPU, gloo on the CPU)
  decode       greedy decoding equals the CPU's tokens; decode tokens/s
  throughput   tokens/s, peak memory and MFU of full and LoRA fine-tuning of a Llama-3.2-1B
               shape at 2,048 tokens x 16 sequences per step, with and without activation
               checkpointing and compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def _importable() -> None:
    """On a machine without `pip install -e .` (a lent GPU gets a bare copy of the tree), make
    `tunewright` the repository through a link in a temporary folder."""
    try:
        import tunewright  # noqa: F401
    except ImportError:
        link_dir = Path(tempfile.mkdtemp(prefix="tunewright-"))
        (link_dir / "tunewright").symlink_to(REPO)
        sys.path.insert(0, str(link_dir))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))


_importable()

from tunewright.data.collate import collate_flat, collate_padded  # noqa: E402
from tunewright.models.args import ModelArgs  # noqa: E402
from tunewright.models.pretrained import build_model  # noqa: E402
from tunewright.training.objectives import causal_lm_loss  # noqa: E402

# Dense bf16 peak of the cards we may be lent (datasheet, SXM, no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
CHECKS: dict[str, Callable[["Ctx"], dict[str, Any]]] = {}


def check(fn: Callable[["Ctx"], dict[str, Any]]) -> Callable[["Ctx"], dict[str, Any]]:
    CHECKS[fn.__name__] = fn
    return fn


class Ctx:
    def __init__(self, device: str, small: bool) -> None:
        self.device = torch.device(device)
        self.small = small
        self.cuda = self.device.type == "cuda"
        # bf16 where the device has it for real; the CPU's bf16 is emulated and slow
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None


def tiny_args(**changes: Any) -> ModelArgs:
    base = ModelArgs(family="llama", vocab_size=512, dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_dim=256)
    return base.replace(**changes)


def random_model(args: ModelArgs, ctx: Ctx, *, seed: int = 0, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Built on the device and initialised there (std 0.02, norms at 1): no CPU round trip."""
    model = build_model(args, device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if "bias" in name else 1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype or ctx.dtype)


def random_items(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        # learnable: each row repeats a short random pattern
        pattern = torch.randint(3, vocab, (5,), generator=g)
        tokens = pattern.repeat(length // 5 + 1)[:length].tolist()
        labels = tokens[1:] + [-100]
        labels[: length // 4] = [-100] * (length // 4)
        items.append({"tokens": tokens, "labels": labels})
    return items


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_losses(model: torch.nn.Module, batches: list[dict], ctx: Ctx, *, padding_free: bool = True,
                 lr: float = 1e-3, chunk_size: int = 1024) -> tuple[list[float], float]:
    """Losses of one AdamW step per batch over the trainable parameters, and tokens/s."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, tokens, seconds = [], 0, 0.0
    for i, batch in enumerate(batches):
        ctx.sync()
        t0 = time.perf_counter()
        loss, n = causal_lm_loss(model, to(batch, ctx.device), chunk_size=chunk_size, padding_free=padding_free)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / max(n, 1))
        ctx.sync()
        if i >= 1:  # the first step pays for allocation and kernels' first use
            seconds += time.perf_counter() - t0
            tokens += batch["num_tokens"]
    return losses, tokens / seconds if seconds else float("nan")


# ---------------------------------------------------------------- checks
@check
def env(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "device": str(ctx.device), "python": sys.version.split()[0]}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["torchao"] = f"unavailable: {e}"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        out["varlen_attn"] = True
    except ImportError:
        out["varlen_attn"] = False
    out["grouped_mm"] = hasattr(torch, "_grouped_mm")
    out["ok"] = not ctx.cuda or bool(out.get("bf16"))
    return out


@check
def lora_tiny(ctx: Ctx) -> dict[str, Any]:
    from tunewright.data.packing import PackedDataset
    from tunewright.modules.peft.apply import apply_lora

    args = tiny_args() if ctx.small else tiny_args(dim=512, num_layers=4, num_heads=8, num_kv_heads=4,
                                                   intermediate_dim=1024, vocab_size=4096)
    items = random_items(64 if ctx.small else 256, (20, 60) if ctx.small else (100, 400), args.vocab_size)
    batch_size, steps = 8, 8 if ctx.small else 30
    rows = [items[(i * batch_size) % len(items):][:batch_size] for i in range(steps)]
    padded = [collate_padded(r, pad_id=0) for r in rows]
    max_len = max(len(i["tokens"]) for i in items)
    packed_rows = PackedDataset(items, max_seq_len=max_len * 2, pad_id=0)
    packed = [collate_padded([packed_rows[j % len(packed_rows)] for j in range(i * 4, i * 4 + 4)], pad_id=0)
              for i in range(steps)]
    out: dict[str, Any] = {}
    flat = [collate_flat(r) for r in rows]  # what the recipes feed: flattened on the host
    for name, batches, padding_free in (("padded", padded, False), ("padding_free", padded, True),
                                         ("host_flat", flat, True), ("packed", packed, True)):
        model = random_model(args, ctx)
        torch.manual_seed(1)
        apply_lora(model, targets="all-linear", rank=8, alpha=16)
        losses, tok_s = train_losses(model, batches, ctx, padding_free=padding_free, lr=3e-3)
        out[name] = {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                     "tokens_per_s": round(tok_s)}
    out["ok"] = (abs(out["padded"]["first_loss"] - out["padding_free"]["first_loss"]) < 0.02
                 and out["host_flat"]["first_loss"] == out["padding_free"]["first_loss"]
                 and all(v["last_loss"] < v["first_loss"] for k, v in out.items() if isinstance(v, dict)))
    return out


@check
def attention(ctx: Ctx) -> dict[str, Any]:
    from tunewright.models.registry import all_families
    from tunewright.modules.attend import Layout, attend

    kernels = {}
    for family in all_families():
        tiny = getattr(family, "tiny", None)
        if tiny is None:
            continue
        model = build_model(tiny)  # on meta: kernels only
        kernels[family.name] = {kind: model.attention_kernels(kind, device=ctx.device, dtype=ctx.dtype)
                                for kind in ("varlen", "batch")}
    # every kernel this device runs, against float64 attention position by position
    errors = {}
    g = torch.Generator().manual_seed(0)
    lens = [37, 64, 11, 100]
    total = sum(lens)
    for window, softcap in ((None, None), (16, None), (None, 30.0), (16, 30.0)):
        q = torch.randn(1, 8, total, 64, generator=g)
        k, v = torch.randn(1, 2, total, 64, generator=g), torch.randn(1, 2, total, 64, generator=g)
        want = _reference_varlen(q, k, v, lens, window, softcap)
        layout = Layout.varlen(lens, ctx.device)
        got = attend(*(t.to(ctx.device, ctx.dtype) for t in (q, k, v)), layout, window=window, softcap=softcap)
        errors[f"varlen window={window} softcap={softcap}"] = round((got.float().cpu() - want).abs().max().item(), 5)
    tolerance = 0.05 if ctx.dtype == torch.bfloat16 else 1e-4
    return {"kernels": kernels, "max_abs_error": errors, "ok": max(errors.values()) < tolerance}


def _reference_varlen(q, k, v, lens, window, softcap) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(q.shape[2])
    allowed = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = (q.double() @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v).float()


@check
def fused_ce(ctx: Ctx) -> dict[str, Any]:
    from tunewright.modules.loss import chunked_cross_entropy

    out: dict[str, Any] = {}
    n, dim = (256, 64) if ctx.small else (8192, 2048)
    for vocab in ((1024, 2048) if ctx.small else (128_256, 256_000)):
        g = torch.Generator().manual_seed(0)
        h = (torch.randn(n, dim, generator=g) * 0.5).to(ctx.device, ctx.dtype)
        w = (torch.randn(vocab, dim, generator=g) * 0.02).to(ctx.device, ctx.dtype)
        t = torch.randint(0, vocab, (n,), generator=g).to(ctx.device)
        row = {}
        for name in ("fused", "reference"):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            ctx.reset_peak()
            ctx.sync()
            t0 = time.perf_counter()
            if name == "fused":
                loss, _ = chunked_cross_entropy(hh[None], t[None], lambda x: x @ ww.t(), head_weight=ww)
            else:
                loss = F.cross_entropy((hh @ ww.t()).float(), t, reduction="sum")
            loss.backward()
            ctx.sync()
            row[name] = {"seconds": round(time.perf_counter() - t0, 4), "peak_gb": ctx.peak_gb(),
                         "loss": loss.item(), "grad_h": hh.grad.float(), "grad_w": ww.grad.float()}
        f, r = row["fused"], row["reference"]
        out[f"vocab_{vocab}"] = {
            "loss_rel_error": abs(f["loss"] - r["loss"]) / abs(r["loss"]),
            "grad_h_max_error": (f["grad_h"] - r["grad_h"]).abs().max().item(),
            "grad_w_max_error": (f["grad_w"] - r["grad_w"]).abs().max().item(),
            "fused": {k: v for k, v in f.items() if k in ("seconds", "peak_gb")},
            "reference": {k: v for k, v in r.items() if k in ("seconds", "peak_gb")},
        }
    tol = 1e-2 if ctx.dtype == torch.bfloat16 else 1e-5
    out["ok"] = all(v["loss_rel_error"] < tol for v in out.values() if isinstance(v, dict))
    return out


@check
def compile(ctx: Ctx) -> dict[str, Any]:  # noqa: A001 - the check's name
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tunewright.training.transforms import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    model = random_model(tiny_args(), ctx)
    compile_blocks(model)
    steps = []
    for seed, lens in enumerate(([9, 17, 5], [12, 7, 20, 3], [30, 2], [8, 8, 8, 8, 8])):
        batch = collate_flat(random_items(len(lens), (min(lens), max(lens)), 512, seed))
        t0 = time.perf_counter()
        loss, n = causal_lm_loss(model, to(batch, ctx.device))
        (loss / n).backward()
        ctx.sync()
        steps.append(round(time.perf_counter() - t0, 3))
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return {"unique_graphs": graphs, "graph_breaks": breaks, "step_seconds": steps, "ok": graphs == 1 and breaks == 0}


@check
def offload(ctx: Ctx) -> dict[str, Any]:
    from tunewright.training.offload import activation_offloading

    args = tiny_args() if ctx.small else tiny_args(dim=2048, num_layers=8, num_heads=16, num_kv_heads=8,
                                                   intermediate_dim=8192, vocab_size=32000)
    items = random_items(8, (64, 64) if ctx.small else (2048, 2048), args.vocab_size)
    batch = to(collate_padded(items, pad_id=0), ctx.device)
    out: dict[str, Any] = {}
    for enabled in (False, True):
        model = random_model(args, ctx)
        ctx.reset_peak()
        with activation_offloading(enabled):
            loss, n = causal_lm_loss(model, batch)
        loss.backward()
        ctx.sync()
        out["on" if enabled else "off"] = {"loss": loss.item(), "peak_gb": ctx.peak_gb(),
                                           "grad_norm": float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))}
    out["ok"] = math.isclose(out["on"]["loss"], out["off"]["loss"], rel_tol=1e-6) and \
        math.isclose(out["on"]["grad_norm"], out["off"]["grad_norm"], rel_tol=1e-4)
    return out


@check
def qlora(ctx: Ctx) -> dict[str, Any]:
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4

    args = tiny_args(dim=256, intermediate_dim=512, vocab_size=512) if ctx.small else \
        tiny_args(dim=2048, num_layers=8, num_heads=16, num_kv_heads=8, intermediate_dim=8192, vocab_size=32000)
    model = random_model(args, ctx)
    apply_lora(model, targets="all-linear", rank=8, alpha=16)
    before = torch.cuda.memory_allocated() if ctx.cuda else None
    quantize_base_nf4(model)
    after = torch.cuda.memory_allocated() if ctx.cuda else None
    items = random_items(32, (32, 64) if ctx.small else (256, 512), args.vocab_size)
    batches = [collate_padded(items[i * 8:(i + 1) * 8], pad_id=0) for i in range(4)] * 3
    losses, tok_s = train_losses(model, batches, ctx, lr=3e-3)
    return {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "tokens_per_s": round(tok_s),
            "weights_gb_before_nf4": before and round(before / 2**30, 3),
            "weights_gb_after_nf4": after and round(after / 2**30, 3), "ok": losses[-1] < losses[0]}


@check
def moe(ctx: Ctx) -> dict[str, Any]:
    from tunewright.modules.moe import grouped_linear

    experts, dim, hidden, tokens = (4, 64, 128, 256) if ctx.small else (64, 2048, 768, 16384)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(experts, hidden, dim, generator=g) * 0.02).to(ctx.device, ctx.dtype).requires_grad_()
    counts = torch.multinomial(torch.ones(experts), tokens, replacement=True, generator=g).bincount(minlength=experts)
    x = torch.randn(tokens, dim, generator=g).to(ctx.device, ctx.dtype).requires_grad_()
    counts = counts.to(ctx.device)
    out: dict[str, Any] = {}
    results = {}
    for name in ("grouped", "per_expert"):
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            if name == "grouped":
                y = grouped_linear(xx, ww, counts)
            else:
                y = torch.cat([c @ ww[e].t() for e, c in enumerate(xx.split(counts.tolist()))])
            y.float().square().sum().backward()
        ctx.sync()
        results[name] = (y.detach().float(), ww.grad.float())
        out[f"{name}_ms"] = round((time.perf_counter() - t0) / 3 * 1e3, 2)
    out["max_error"] = (results["grouped"][0] - results["per_expert"][0]).abs().max().item()
    out["grad_max_error"] = (results["grouped"][1] - results["per_expert"][1]).abs().max().item() / 3
    out["ok"] = out["max_error"] < (0.05 if ctx.dtype == torch.bfloat16 else 1e-4)
    return out


@check
def torchrun(ctx: Ctx) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(REPO / "recipes" / "sft.py"), "--config", str(REPO / "configs" / "llama" / "tiny_lora_distributed.yaml"),
               f"output_dir={tmp}/run", f"device={ctx.device.type}", "max_steps=4", "progress_bar=false",
               "eval_every_n_steps=null", "save_every_n_steps=2", "save_final_model=false"]
        if ctx.cuda:
            cmd.append("dtype=bf16")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - t0
        rows = []
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"returncode": done.returncode, "seconds": round(seconds, 1), "losses": losses,
            "stderr_tail": done.stderr[-1500:] if done.returncode else "",
            "ok": done.returncode == 0 and len(losses) == 4 and all(math.isfinite(x) for x in losses)}


@check
def decode(ctx: Ctx) -> dict[str, Any]:
    from tunewright.training.generation import generate

    args = tiny_args(vocab_size=512)
    model = random_model(args, ctx, dtype=torch.float32).eval()
    cpu = random_model(args, Ctx("cpu", True), dtype=torch.float32).eval()
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12]]
    got = generate(model, prompts, max_new_tokens=16)
    want = generate(cpu, prompts, max_new_tokens=16)
    out: dict[str, Any] = {"equal_to_cpu": got == want}
    speed_args = tiny_args() if ctx.small else ModelArgs(family="llama", vocab_size=128256, dim=2048, num_layers=16,
                                                         num_heads=32, num_kv_heads=8, intermediate_dim=8192)
    fast = random_model(speed_args, ctx).eval()
    for batch in (1, 8):
        new = 16 if ctx.small else 128
        ctx.sync()
        t0 = time.perf_counter()
        generate(fast, [[1, 2, 3, 4]] * batch, max_new_tokens=new)
        ctx.sync()
        out[f"tokens_per_s_batch{batch}"] = round(batch * new / (time.perf_counter() - t0), 1)
    out["ok"] = out["equal_to_cpu"]
    return out


@check
def throughput(ctx: Ctx) -> dict[str, Any]:
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.training.precision import Precision
    from tunewright.training.transforms import apply_activation_checkpointing, compile_blocks

    if ctx.small:
        args, seq, rows_per_step, micro = tiny_args(), 64, 4, 2
    else:  # Llama-3.2-1B: 16 layers, dim 2048, 32/8 heads, vocab 128,256, tied
        from tunewright.models.registry import find_size

        args, seq, rows_per_step, micro = find_size("llama3_2_1b")[1], 2048, 16, 4
    # (method, activation checkpointing, compile, master dtype): the recipes' default is fp32
    # master weights under bf16 compute (training/precision.py); one row shows pure bf16.
    configs = [("lora", False, False, "fp32"), ("lora", True, False, "fp32"), ("lora", False, True, "fp32"),
               ("full", False, False, "fp32"), ("full", True, False, "fp32"), ("full", True, True, "fp32"),
               ("full", True, False, "bf16")]
    if ctx.small:  # the code paths, not the figures: one compiled configuration is enough
        configs = configs[:4]
    n_params = None
    out: dict[str, Any] = {"seq_len": seq, "tokens_per_step": seq * rows_per_step}
    for method, ac, compiled, master in configs:
        key = f"{method}{'_ac' if ac else ''}{'_compile' if compiled else ''}{'_pure_bf16' if master == 'bf16' else ''}"
        try:
            torch._dynamo.reset()
            model = random_model(args, ctx)
            n_params = sum(p.numel() for p in model.parameters())
            if method == "lora":
                apply_lora(model, targets="all-linear", rank=16, alpha=32)
            if ctx.dtype == torch.bfloat16:
                Precision("bf16", master).apply(model)
            if ac:
                apply_activation_checkpointing(model)
            if compiled:
                compile_blocks(model)
            items = random_items(rows_per_step, (seq, seq), args.vocab_size)
            batches = [collate_flat(items[i:i + micro]) for i in range(0, rows_per_step, micro)]
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5)
            ctx.reset_peak()
            times = []
            for step in range(2 if ctx.small else 6):
                ctx.sync()
                t0 = time.perf_counter()
                for batch in batches:
                    loss, n = causal_lm_loss(model, to(batch, ctx.device))
                    (loss / (n * len(batches))).backward()
                    del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                ctx.sync()
                times.append(time.perf_counter() - t0)
            seconds = sum(times[2:]) / len(times[2:]) if len(times) > 2 else times[-1]
            tok_s = seq * rows_per_step / seconds
            # FLOPs per token: 6N (full) or 4N (LoRA: no weight gradients of the frozen base),
            # plus causal attention's 6 * 2 * layers * seq * dim / 2 (forward 1x, backward 2x).
            attn = 6 * args.num_layers * seq * args.num_heads * args.resolved_head_dim
            flops = (6 if method == "full" else 4) * n_params + attn
            row = {"tokens_per_s": round(tok_s), "step_seconds": round(seconds, 3), "peak_gb": ctx.peak_gb()}
            peak = next((v for k, v in PEAK_TFLOPS.items() if ctx.cuda and k in torch.cuda.get_device_name()), None)
            if peak:
                row["mfu_percent"] = round(100 * flops * tok_s / (peak * 1e12), 1)
            out[key] = row
            del model, opt
        except torch.OutOfMemoryError as e:  # noqa: PERF203 - a row per config
            out[key] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
    out["params"] = n_params
    out["ok"] = all("tokens_per_s" in v for k, v in out.items() if isinstance(v, dict))
    return out


# ---------------------------------------------------------------- report
def markdown(results: dict[str, Any], command: str) -> str:
    lines = [f"# bench/gpu.py ({time.strftime('%Y-%m-%d')})", "", f"`{command}`", "",
             "| check | ok | seconds | figures |", "|---|---|---|---|"]
    for name, r in results.items():
        figures = {k: v for k, v in r.items() if k not in ("ok", "seconds", "error", "traceback")}
        text = json.dumps(figures, default=str)[:900].replace("|", "/")
        if "error" in r:
            text = f"**error**: {r['error']}"
        lines.append(f"| {name} | {r.get('ok')} | {r.get('seconds')} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU, CI)")
    parser.add_argument("--only", default=None, help="comma-separated checks (default: all)")
    parser.add_argument("--out", default=str(REPO / "out" / "gpu"))
    parser.add_argument("--time-budget", type=float, default=480.0, help="skip checks after this many seconds")
    args = parser.parse_args(argv)
    ctx = Ctx(args.device, args.small)
    if ctx.cuda:  # as the recipes do (tf32: true)
        from tunewright.training.precision import enable_tf32

        enable_tf32(torch.device(args.device), True)
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    start, results = time.perf_counter(), {}
    for name in names:
        if time.perf_counter() - start > args.time_budget:
            results[name] = {"ok": None, "error": "skipped: time budget used up"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](ctx)
        except Exception as e:  # noqa: BLE001 - every check runs, failures are reported
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: ok={results[name].get('ok')} ({results[name]['seconds']} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu.md").write_text(markdown(results, command))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
