"""`tune estimate` and the table every run prints: the parameter, gradient and optimizer bytes of
every shipped config equal a count made here on the model built on meta (the optimizer's state
by running the optimizer's own step on meta tensors); the activations measured on meta match a
real forward on the CPU; the "does not fit" line names the biggest term and a fix that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tunewright.training.config import load_config
from tunewright.training.entry import import_recipe, load_recipe_config
from tunewright.tune_cli.main import main as tune

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _cfg(path: Path, overrides: tuple[str, ...] = ()):
    recipe = load_config(path)["recipe"]
    return load_recipe_config(import_recipe(REPO / "recipes" / f"{recipe}.py"), path, list(overrides))


def _size(cfg, config: Path) -> str | None:
    """The size table row to estimate a config whose model is not on this machine by: None when
    the model directory is there or its name spells a size; else the row the config's own name
    spells (`smollm2/135M_lora_quickstart.yaml` -> smollm2_135m: the quickstart and demo configs
    read a model the quickstart writes, absent on a fresh checkout)."""
    from tunewright.training.estimate.model import size_from_name

    path = cfg.model["path"]
    if (Path(path) / "config.json").is_file() or size_from_name(path):
        return None
    size = size_from_name(f"{config.parent.name}_{config.stem.split('_')[0]}")
    assert size, f"{config}: neither its model path nor its name spells a size"
    return size


def _reference_counts(cfg, size: str | None = None) -> tuple[int, int, int, int]:
    """(trainable bytes, frozen bytes, optimizer state bytes, bytes of the largest trainable
    tensor) counted on the model built on meta
    the way Placement builds it for FSDP2: load dtype, adapters, master dtype for what trains."""
    from tunewright.models.pretrained import build_model
    from tunewright.models.registry import find_size, model_args
    from tunewright.training.estimate.model import size_from_name
    from tunewright.training.instantiate import instantiate
    from tunewright.training.lora_setup import add_lora
    from tunewright.training.precision import Precision

    path = cfg.model["path"]
    if size is None:
        args = model_args(path)[1] if (Path(path) / "config.json").is_file() else find_size(size_from_name(path))[1]
    else:
        args = find_size(size)[1]
    if cfg.model.get("num_labels"):  # a reward model's score head
        from tunewright.models.score import with_num_labels

        args = with_num_labels(args, cfg.model["num_labels"], Path(path))
    precision = Precision.from_config(cfg)
    lora = getattr(cfg, "lora_rank", None) is not None
    model = build_model(args).to(precision.load_dtype(full=not lora))
    if lora:
        add_lora(model, cfg)
    trains = hasattr(cfg, "optimizer")
    if trains:
        precision.apply(model, autocast=False)
    else:
        model.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    state = 0
    if trainable:
        optimizer = instantiate(cfg.optimizer, params=trainable)
        if hasattr(optimizer, "_new_buffer"):  # torchao's low-bit Adam: its own state allocation
            def inner(t):
                return [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "codes") else [t]

            states = [{"step": torch.tensor(0.0), "m": optimizer._new_buffer(p, True),
                       "v": optimizer._new_buffer(p, False)} for p in trainable]
            tensors = [x for s in states for t in s.values() for x in inner(t)]
        else:
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # on meta tensors: the state is allocated, nothing computed
            tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        state = sum(t.numel() * t.element_size() for t in tensors)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return nbytes(trainable), nbytes(frozen), state, max((nbytes([p]) for p in trainable), default=0)


# The tiny configs run in the fast tier; the real-model ones (a few seconds each on meta, ~7
# minutes for all on a loaded 2-core machine) in the slow tier.
@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO / "configs")),
                                               marks=() if p.stem.startswith("tiny") else pytest.mark.slow)
                                  for p in CONFIGS])
def test_parameter_gradient_optimizer_bytes_are_exact(path):
    from tunewright.training.estimate.terms import estimate

    cfg = _cfg(path)
    size = _size(cfg, path)
    est = estimate(cfg, activations=False, size=size)
    trainable, frozen, state, largest = _reference_counts(cfg, size)
    if hasattr(cfg, "optimizer"):
        lora = getattr(cfg, "lora_rank", None) is not None
        assert est.term("adapters" if lora else "weights that train").bytes == trainable
        in_backward = getattr(cfg, "optimizer_in_backward", False)  # one gradient at a time
        assert est.term("gradients").bytes == (largest if in_backward else trainable)
        assert est.term("optimizer state").bytes == state
    frozen_term = est.term("frozen base") or est.term("weights")
    if getattr(cfg, "quantize_base", False):  # NF4 is checked against torchao below
        assert frozen_term.bytes < frozen
    else:
        assert (frozen_term.bytes if frozen_term else 0) == frozen


def test_nf4_bytes_equal_torchaos_tensor():
    from tunewright.modules.peft.nf4 import nf4_module
    from tunewright.modules.peft.qlora import BLOCK_SIZE, SCALER_BLOCK_SIZE
    from tunewright.training.estimate.model import nf4_bytes

    for shape, dtype in (((256, 128), torch.bfloat16), ((64, 64), torch.float32), ((576, 1536), torch.bfloat16)):
        w = torch.randn(shape, dtype=dtype)
        import math

        scaler = math.gcd(w.numel() // BLOCK_SIZE, SCALER_BLOCK_SIZE)
        t = nf4_module().to_nf4(w, BLOCK_SIZE, scaler)
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]]
        assert nf4_bytes(w.numel(), dtype.itemsize) == sum(x.numel() * x.element_size() for x in inner), shape


def test_size_from_a_directory_name():
    from tunewright.training.estimate.model import size_from_name

    assert size_from_name("/tmp/Meta-Llama-3.1-8B-Instruct") == "llama3_1_8b"
    assert size_from_name("/tmp/Phi-4-mini-instruct") == "phi4_mini"
    assert size_from_name("/tmp/phi-4") == "phi4"
    assert size_from_name("/tmp/Qwen3-30B-A3B") == "qwen3_30b_a3b"
    assert size_from_name("/tmp/my-model") is None


def _real_saved_bytes(model: nn.Module, tokens: torch.Tensor, **kw) -> int:
    saved: dict[int, int] = {}

    def pack(t):
        if not (isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, hidden_only=True, **kw)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_activations_on_meta_match_a_real_cpu_forward(family, padding_free):
    from tunewright.models.pretrained import build_model
    from tunewright.models.registry import get_family
    from tunewright.training.estimate.activations import measure

    args = get_family(family).tiny
    rows, seq = 2, 512  # long enough that an [s, s] attention matrix kept by mistake would show
    real = build_model(args, device="cpu")
    tokens = torch.randint(0, args.vocab_size, (rows, seq))
    kw = {"seq_lens": [seq] * rows} if padding_free else {}
    expected = _real_saved_bytes(real, tokens.reshape(1, -1) if padding_free else tokens, **kw)
    got = measure(build_model(args), args, rows=rows, seq_len=seq, padding_free=padding_free,
                  dtype=torch.float32).total()
    assert abs(got - expected) / expected < 0.03, (got, expected)


def test_checkpointing_keeps_block_inputs_and_one_block():
    from tunewright.models.pretrained import build_model
    from tunewright.models.registry import get_family
    from tunewright.training.estimate.activations import measure

    args = get_family("llama").tiny
    acts = measure(build_model(args), args, rows=2, seq_len=32, padding_free=True, dtype=torch.float32)
    block_input = 2 * 32 * args.dim * 4
    assert acts.total(checkpointing=True) == acts.outside + args.num_layers * block_input + max(acts.per_layer)
    assert acts.total(checkpointing=True) < acts.total()


def test_does_not_fit_names_the_biggest_term_and_a_fix_that_fits(capsys):
    from tunewright.training.estimate.terms import estimate

    cfg = _cfg(REPO / "configs/llama3_1/70B_lora_distributed.yaml")
    est = estimate(cfg, device_type="cuda")
    biggest = max(est.terms, key=lambda t: t.bytes).name
    code = tune(["estimate", "--config", "llama3_1/70B_lora_distributed", "--device", "h100"])
    out = capsys.readouterr().out
    assert code == 1
    verdict = next(line for line in out.splitlines() if "does not fit" in line)
    assert f"biggest term: {biggest} (" in verdict and biggest == "frozen base"  # 70B x 2 bytes
    assert "would fit with quantize_base=true" in out
    # The fix, estimated again, fits an H100's 81,559 MiB.
    fixed = estimate(_cfg(REPO / "configs/llama3_1/70B_lora_distributed.yaml", ("quantize_base=true",)),
                     device_type="cuda")
    assert fixed.total < 81559 * 2**20


def test_full_fine_tuning_too_big_for_a_small_gpu_suggests_lora(capsys):
    code = tune(["estimate", "--config", "llama3_2/1B_full_single_device", "--device", "l4",
                 "enable_activation_checkpointing=true"])
    out = capsys.readouterr().out
    assert code == 1 and "biggest term: optimizer state" in out and "would fit with lora_rank=16" in out


def test_fsdp_divides_the_sharded_terms():
    from tunewright.training.estimate.terms import estimate

    cfg = _cfg(REPO / "configs/llama/tiny_full.yaml")
    one, four = estimate(cfg, activations=False), estimate(cfg, world_size=4, activations=False)
    for name in ("weights that train", "gradients", "optimizer state"):
        assert four.term(name).bytes == one.term(name).bytes // 4


def test_kv_cache_of_generation_recipes():
    from tunewright.training.estimate.terms import estimate

    cfg = _cfg(REPO / "configs/llama/tiny_grpo.yaml")
    a = _cfg(REPO / "configs/llama/tiny_grpo.yaml").model
    from tunewright.models.registry import model_args

    args = model_args(a["path"])[1]
    length = cfg.tokenizer["max_seq_len"] + cfg.max_new_tokens
    want = 2 * args.num_layers * cfg.batch_size * length * args.num_kv_heads * args.resolved_head_dim * 4
    assert estimate(cfg, activations=False).term("KV cache").bytes == want


@pytest.mark.parametrize("recipe,config", [("grpo", "llama/tiny_grpo"), ("ppo", "llama/tiny_ppo_lora")])
def test_a_generating_run_estimates_its_longest_prompt_not_the_whole_context(tmp_path, capsys, recipe, config):
    """GRPO and PPO print the estimate once their prompts are tokenised: a micro-batch row is
    the longest prompt plus max_new_tokens (the config sets no max_prompt_len)."""
    from tunewright.data.prompts import PromptDataset
    from tunewright.training.entry import run_recipe_file

    seen: list[int] = []
    original = PromptDataset.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(max(len(item["prompt_ids"]) for item in self.items))

    cfg_path = REPO / "configs" / f"{config}.yaml"
    cfg = _cfg(cfg_path)
    assert not (cfg.dataset or {}).get("max_prompt_len")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PromptDataset, "__init__", spy)
        run_recipe_file(REPO / "recipes" / f"{recipe}.py", cfg_path,
                        [f"output_dir={tmp_path}", "max_steps=1", "progress_bar=false", "num_threads=1",
                         "save_every_n_steps=null", "eval_every_n_steps=null"])
    out = capsys.readouterr().out
    assert out.count("memory estimate:") == 1
    rows = max(cfg.batch_size // cfg.num_minibatches, 1)
    length = seen[0] + cfg.max_new_tokens  # the train set's, tokenised first
    assert length < cfg.tokenizer["max_seq_len"]
    assert f"{rows} x {length} = {rows * length:,} tokens per micro-batch" in out


def test_tiny_run_fits_on_cpu(capsys):
    assert tune(["estimate", "--config", "llama/tiny_lora"]) == 0
    out = capsys.readouterr().out
    assert "fits on cpu" in out and "total" in out and "activations" in out


def test_unknown_gpu_is_one_line(capsys):
    assert tune(["estimate", "--config", "llama/tiny_lora", "--device", "h300"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "h300" in lines[0] and "h100" in lines[0]


_FIRST_STEP = r"""
import torch
from tunewright.models.pretrained import build_model
from tunewright.models.registry import get_family
def file_pages():  # MiB of mapped files (code, shared libraries) resident in this process
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssFile:")) / 1024
model = build_model(get_family("llama").tiny, device="cpu")
before = file_pages()
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randint(0, 100, (2, 128)), hidden_only=True).square().mean().backward()
optimizer.step()
print(file_pages() - before)
"""


def test_cpu_runtime_term_holds_the_code_pages_a_first_step_touches():
    """The CPU-only runtime term is at least what a fresh process maps in (torch's kernel code)
    the first time it runs a forward, backward and AdamW step; a GPU estimate has no such term."""
    import subprocess
    import sys

    from tunewright.training.estimate.devices import CPU_RUNTIME
    from tunewright.training.estimate.terms import estimate

    done = subprocess.run([sys.executable, "-c", _FIRST_STEP], capture_output=True, text=True, check=True)
    touched = float(done.stdout.split()[-1]) * 2**20
    assert 0 < touched <= CPU_RUNTIME, touched / 2**20
    cfg = _cfg(REPO / "configs/llama/tiny_lora.yaml")
    cpu, gpu = estimate(cfg, activations=False), estimate(cfg, device_type="cuda", activations=False)
    assert cpu.term("CPU runtime").bytes == CPU_RUNTIME and gpu.term("CPU runtime") is None
    assert cpu.loading >= CPU_RUNTIME
