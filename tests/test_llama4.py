"""Llama 4 (text) against transformers' Llama4ForCausalLM on random tiny configs: chunked local
attention past the chunk size, NoPE layers with temperature tuning, a shared expert beside
sigmoid-routed experts, interleaved MoE layers, tied and untied heads; the text model of a
multimodal (Llama4ForConditionalGeneration) checkpoint, saved back text-only; KV-cache
decoding; the published sizes' parameter counts; checkpoint variants we cannot map; LoRA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.hf_reference import (TOLERANCE, VOCAB, assert_saved_reloads, make_hf_model, max_logit_diff,
                                random_tokens)
from tunewright.models import load_pretrained
from tunewright.models.llama4 import SIZES, args_from_hf, hf_config
from tunewright.models.pretrained import build_model
from tunewright.modules.moe import MoE

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a shared 2-core machine a second thread only contends (seconds per step).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SEQ = 40  # five chunks of 8, and positions past two temperature floors of 4 (and 8, 16, 32)
_BASE = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_local_experts=4, attention_chunk_size=8,
             floor_scale=4, attn_scale=0.5)
CASES = {
    # Scout's shape: every layer MoE, q/k norms, llama3 RoPE scaling, NoPE every 4th layer.
    "scout_like": dict(_BASE, num_hidden_layers=4, rope_parameters={
        "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 500000.0}),
    # Maverick's: MoE every other layer, no q/k norm; top-2 so that two scaled inputs add up; tied.
    "maverick_like_tied_top2": dict(_BASE, num_hidden_layers=4, interleave_moe_layer_step=2, use_qk_norm=False,
                                    num_experts_per_tok=2, tie_word_embeddings=True),
    # Explicit per-layer lists and attention biases, NoPE in the middle.
    "explicit_lists_bias": dict(_BASE, num_hidden_layers=3, no_rope_layers=[1, 0, 1], moe_layers=[0, 2],
                                attention_bias=True, num_key_value_heads=1),
}


def _hf(tmp_path, name: str, **extra):
    model, path = make_hf_model(tmp_path, "Llama4TextConfig", "Llama4ForCausalLM", **{**CASES[name], **extra})
    with torch.no_grad():  # decisive routing, experts that matter, and q/k large enough for RoPE to show
        for pname, p in model.named_parameters():
            if "router" in pname or "experts" in pname:
                p.mul_(10.0)
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(tmp_path, name):
    hf_model, hf_dir = _hf(tmp_path, name)
    ours = load_pretrained(hf_dir)
    assert ours.args.tie_embeddings == bool(CASES[name].get("tie_word_embeddings"))
    moe = [i for i, layer in enumerate(ours.layers) if isinstance(layer.mlp, MoE)]
    assert moe == list(hf_model.config.moe_layers) and all(ours.layers[i].mlp.shared_expert for i in moe)
    assert max_logit_diff(hf_model, ours, random_tokens(2, SEQ)) <= TOLERANCE


def _set(model, attr: str, value) -> None:
    for layer in model.layers:
        if getattr(layer.attn, attr) not in (None, False):
            setattr(layer.attn, attr, value)


@pytest.mark.parametrize("change", ["no_chunks", "no_temperature", "halves_rope", "no_shared_expert",
                                    "weights_on_outputs"])
def test_each_llama4_part_shows_in_the_logits(tmp_path, change):
    """The parity above is not vacuous: undoing any one Llama 4 part moves the logits."""
    hf_model, hf_dir = _hf(tmp_path, "scout_like")
    ours = load_pretrained(hf_dir)
    moes = [layer.mlp for layer in ours.layers if isinstance(layer.mlp, MoE)]
    if change == "no_chunks":
        _set(ours, "chunk_size", None)
    elif change == "no_temperature":
        _set(ours, "temperature", None)
    elif change == "halves_rope":
        _set(ours, "rope_interleaved", False)
    elif change == "no_shared_expert":
        for m in moes:
            m.shared_expert = None
    else:
        for m in moes:
            m.weight_inputs = False
    assert max_logit_diff(hf_model, ours, random_tokens(2, SEQ)) > 10 * TOLERANCE


@pytest.mark.parametrize("name", ["scout_like", "maverick_like_tied_top2"])
def test_saved_output_reloads_in_transformers(tmp_path, name):
    _, hf_dir = _hf(tmp_path, name)
    assert_saved_reloads(tmp_path, load_pretrained(hf_dir), hf_dir, "Llama4ForCausalLM", seq=SEQ)


VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)


def _multimodal(tmp_path):
    """A random Llama4ForConditionalGeneration (the published checkpoints' class), saved."""
    text = {"vocab_size": VOCAB, **CASES["scout_like"]}
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=VISION)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            if "router" in pname or "experts" in pname:
                p.mul_(10.0)
    model.save_pretrained(tmp_path / "mm")
    return model, tmp_path / "mm"


def test_multimodal_checkpoint_loads_its_text_model_and_saves_text_only(tmp_path):
    hf_model, mm_dir = _multimodal(tmp_path)
    names = list(load_file(str(mm_dir / "model.safetensors")))
    assert any(n.startswith("vision_model.") for n in names)
    assert "language_model.model.layers.0.feed_forward.experts.gate_up_proj" in names
    ours = load_pretrained(mm_dir)
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():  # text tokens only: the multimodal model is its language model
        want = hf_model.language_model(input_ids=tokens).logits
        assert (ours(tokens) - want).abs().max().item() <= TOLERANCE
    assert_saved_reloads(tmp_path, ours, mm_dir, "Llama4ForCausalLM", seq=SEQ)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama4_text" and config["architectures"] == ["Llama4ForCausalLM"]
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in
                   load_file(str(tmp_path / "out" / "model.safetensors")))


def test_kv_cache_decoding_past_the_chunk_equals_the_full_forward(tmp_path):
    """Prefill, a block that crosses a chunk boundary, then one token at a time past several
    chunks: each step equals the whole sequence's forward (and so transformers')."""
    hf_model, hf_dir = _hf(tmp_path, "scout_like")
    ours = load_pretrained(hf_dir)
    tokens = random_tokens(2, SEQ, seed=3)
    with torch.no_grad():
        want = hf_model(tokens).logits
        ours.setup_caches(2, SEQ)
        steps = [ours(tokens[:, :5], cache_pos=0), ours(tokens[:, 5:13], cache_pos=5)]
        steps += [ours(tokens[:, i:i + 1], cache_pos=i) for i in range(13, SEQ)]
    assert (torch.cat(steps, dim=1) - want).abs().max().item() <= TOLERANCE


def test_packed_sequences_count_chunks_and_temperatures_from_their_own_start(tmp_path):
    """Two sequences end to end (padding-free, and packed with a document mask) give each one's
    own logits: chunks and the NoPE temperature restart with the positions."""
    _, hf_dir = _hf(tmp_path, "scout_like")
    ours = load_pretrained(hf_dir)
    a, b = random_tokens(1, 21, seed=4), random_tokens(1, 19, seed=5)
    tokens = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(21), torch.arange(19)])[None]
    doc_ids = torch.cat([torch.zeros(21), torch.ones(19)]).long()[None]
    with torch.no_grad():
        want = torch.cat([ours(a), ours(b)], dim=1)
        flat = ours(tokens, input_pos=pos, seq_lens=[21, 19])
        packed = ours(tokens, input_pos=pos, doc_ids=doc_ids)
    assert (flat - want).abs().max().item() <= TOLERANCE
    assert (packed - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("size", SIZES)
def test_size_rows_have_transformers_parameter_count(size):
    args = SIZES[size]
    config = transformers.Llama4TextConfig(**{k: v for k, v in hf_config(args).items() if k != "architectures"})
    with torch.device("meta"):
        hf_model = transformers.Llama4ForCausalLM(config)
    want = sum(p.numel() for p in hf_model.parameters())
    assert sum(p.numel() for p in build_model(args).parameters()) == want == args.num_params()
    assert want > (100e9 if size.endswith("16e") else 390e9)  # 109B and 400B as announced
    assert args_from_hf(json.loads(json.dumps(hf_config(args)))) == args  # the config we write reads back


# ---------------------------------------------------------------- variants we cannot map
def _one_line(path) -> str:
    with pytest.raises(ValueError) as info:
        load_pretrained(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_checkpoint_variants_we_cannot_map_are_one_line(tmp_path):
    _, mm_dir = _multimodal(tmp_path)
    config = json.loads((mm_dir / "config.json").read_text())
    # Maverick's FP8 release: quantized weights and per-expert tensors.
    (mm_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fbgemm_fp8"}}))
    assert "quantization_config: fbgemm_fp8" in _one_line(mm_dir)
    (mm_dir / "config.json").write_text(json.dumps(config))
    path = mm_dir / "model.safetensors"
    tensors = load_file(str(path))
    expert = "language_model.model.layers.1.feed_forward.experts.0.gate_proj.weight"
    save_file({**tensors, expert: torch.zeros(32, 64)}, str(path))
    assert f"tensor '{expert}' has no place in a llama4 model" in _one_line(mm_dir)
    # A vision-only checkpoint: no text model at all.
    save_file({k: v for k, v in tensors.items() if not k.startswith("language_model.")}, str(path))
    message = _one_line(mm_dir)
    assert "checkpoint lacks 'model." in message and "tensors missing" in message
    (mm_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "text_config"}))
    assert "needs a 'text_config'" in _one_line(mm_dir)


# ---------------------------------------------------------------- LoRA and QLoRA
def test_lora_adapts_attention_shared_and_routed_experts_and_learns():
    from tunewright.models.builder import init_weights
    from tunewright.models.registry import get_family
    from tunewright.modules.peft.apply import apply_lora, merge_lora

    args = get_family("llama4").tiny
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    adapted = apply_lora(model, targets="all-linear", rank=4, alpha=8.0)
    assert {"layers.1.attn.q_proj", "layers.3.attn.o_proj", "layers.1.mlp.experts",
            "layers.1.mlp.shared_expert.gate_proj", "layers.0.mlp.down_proj"} <= set(adapted)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert model.layers[1].mlp.experts.lora["gate_proj"].lora_b.abs().sum() > 0  # the experts trained
    with torch.no_grad():
        before = model(tokens)
        assert (merge_lora(model)(tokens) - before).abs().max().item() <= TOLERANCE


def test_qlora_quantizes_attention_and_shared_expert_and_runs():
    pytest.importorskip("torchao")
    from tunewright.models.builder import init_weights
    from tunewright.models.registry import get_family
    from tunewright.modules.peft.apply import apply_lora
    from tunewright.modules.peft.qlora import quantize_base_nf4

    args = get_family("llama4").tiny
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    adapted = apply_lora(model, targets="all-linear", rank=4, alpha=8.0, experts=None)
    assert quantize_base_nf4(model) == len(adapted) > 0
    tokens = torch.randint(0, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert model.layers[1].mlp.shared_expert.up_proj.lora_b.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- chunked attention, kernel by kernel
def _chunked_reference(q, k, v, positions, chunk):
    """Loops over positions: query i sees key j of the same sequence with j <= i and both in one
    chunk of `chunk` positions, counted from the sequence's start (`positions` restart there)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            same_seq = positions[i] - positions[j] == i - j  # no restart between them
            allowed[i, j] = bool(same_seq and positions[i] // chunk == positions[j] // chunk)
    scores = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.double()).to(q.dtype)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["per_sequence", "document_mask", "flex", "decode"])
def test_chunked_attention_kernels_equal_a_loop_over_positions(kernel, monkeypatch):
    """The kernels the CPU tests above do not reach (the compiled padding-free mask, the CUDA
    flex mask, written here against the eager flex_attention) keep chunks per sequence."""
    from tunewright.modules import attend as attend_module
    from tunewright.modules.attend import Layout, attend

    g = torch.Generator().manual_seed(0)
    lens, chunk = [13, 9], 4
    q = torch.randn(1, 4, sum(lens), 8, generator=g)
    k, v = torch.randn(1, 2, sum(lens), 8, generator=g), torch.randn(1, 2, sum(lens), 8, generator=g)
    positions = torch.cat([torch.arange(n) for n in lens])
    want = _chunked_reference(q, k, v, positions, chunk)
    layout = Layout.varlen(lens, "cpu")
    layout.positions = positions[None]
    if kernel == "per_sequence":
        got = attend(q, k, v, layout, chunk=chunk)
    elif kernel == "document_mask":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert attend_module.kernel_for(layout, q.device, q.dtype, q.shape[2], window=None, softcap=None,
                                        chunk=chunk) == "document_mask(sdpa)"
        got = attend(q, k, v, layout, chunk=chunk)
    elif kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        assert attend_module.kernel_for(layout, torch.device("cuda"), torch.bfloat16, q.shape[2], window=None,
                                        softcap=None, chunk=chunk) == "flex"
        monkeypatch.setattr(attend_module, "_compiled_flex", lambda: flex_attention)
        got = attend_module._flex(q, k, v, layout, None, None, None, chunk)
        padded = Layout("batch", positions=torch.arange(lens[0])[None])  # chunks by index in a padded row
        n = lens[0]
        torch.testing.assert_close(attend_module._flex(q[:, :, :n], k[:, :, :n], v[:, :, :n], padded, None, None,
                                                       None, chunk), want[:, :, :n], atol=1e-5, rtol=1e-5)
    else:  # one token at a time against a cache of the first sequence
        n = lens[0]
        got = torch.cat([attend(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], Layout("cached", cache_pos=i),
                                chunk=chunk) for i in range(n)], dim=2)
        want = want[:, :, :n]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- FSDP2: the generic sharded path
def test_fsdp2_sharded_load_forward_and_merged_export(tmp_path):
    """One FSDP2 process (gloo): the checkpoint's transposed fused experts load into shards, the
    sharded model's logits equal the one-device model's, and the merged export of per-expert
    LoRA equals the one-device merge."""
    import copy

    from tests.test_distributed_recipes import split_checkpoint
    from tunewright.models import save_pretrained
    from tunewright.modules.peft.apply import apply_lora, merge_lora
    from tunewright.training.parallel import (build_mesh, build_meta_model, close_distributed, init_distributed,
                                              materialize, shard_fsdp2)
    from tunewright.training.sharded_io import load_full_into, load_hf_sharded, save_pretrained_sharded

    _, hf_dir = _hf(tmp_path, "maverick_like_tied_top2")
    source = split_checkpoint(hf_dir, tmp_path / "source")
    reference = load_pretrained(source)
    apply_lora(reference, targets="all-linear", rank=4, experts="per_expert")
    device, created = init_distributed(torch.device("cpu"))
    try:
        mesh = build_mesh(device, data_parallel_dim=None, tensor_parallel_dim=1)
        model, _ = build_meta_model({"_component_": "tunewright.models.load_pretrained", "path": str(source)},
                                    torch.float32)
        apply_lora(model, targets="all-linear", rank=4, experts="per_expert")
        skeleton = copy.deepcopy(model)
        shard_fsdp2(model, mesh["dp"])
        materialize(model, torch.device("cpu"))
        load_hf_sharded(model, source, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same adapters on both sides, B != 0 so that the merge shows
            for name, p in reference.named_parameters():
                if "lora" in name:
                    value = torch.randn(p.shape, generator=gen) * 0.1
                    p.copy_(value)
                    load_full_into(model, name, value)
            tokens = random_tokens(2, SEQ)
            assert (model(tokens) - reference(tokens)).abs().max().item() <= TOLERANCE
        sharded = save_pretrained_sharded(model, skeleton, tmp_path / "sharded", source_dir=source, merge=True)
    finally:
        close_distributed(created)
    single = save_pretrained(merge_lora(reference), tmp_path / "single", source_dir=source)
    for fname in {f.name for f in single.glob("*.safetensors")}:
        got, want = load_file(str(sharded / fname)), load_file(str(single / fname))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_peft_loads_our_attention_and_shared_expert_adapter(tmp_path):
    """With the routed experts frozen (what PEFT's format can hold), our adapter on attention,
    the shared expert and the dense MLPs loads in `peft` on transformers' model: equal logits."""
    peft = pytest.importorskip("peft")
    from tunewright.models.peft_adapter import save_peft_adapter
    from tunewright.modules.peft.apply import apply_lora

    _, hf_dir = _hf(tmp_path, "maverick_like_tied_top2")
    ours = load_pretrained(hf_dir)
    apply_lora(ours, targets="all-linear", rank=4, experts=None)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.1)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_path=str(hf_dir))
    base = transformers.Llama4ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert max_logit_diff(theirs, ours, random_tokens(2, SEQ)) <= TOLERANCE


def test_left_padded_cached_rows_count_chunks_from_their_first_token(tmp_path):
    """Rollouts left-pad shorter prompts in a cached batch (`training/rollout.py`): each row's
    chunks and temperatures follow its own positions, so its logits, prefill and decode, equal
    the row's own forward."""
    _, hf_dir = _hf(tmp_path, "scout_like")
    ours = load_pretrained(hf_dir)
    lens, total = [21, 12], 30
    seqs = [random_tokens(1, total - 21 + n, seed=6 + i)[0] for i, n in enumerate(lens)]  # prompt + 9 new
    width = max(lens)
    starts = torch.tensor([width - n for n in lens])
    tokens = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), s]) for n, s in zip(lens, seqs)])
    cols = torch.arange(tokens.shape[1])
    key_mask = cols[None] >= starts[:, None]
    positions = (cols[None] - starts[:, None]).clamp(min=0)
    with torch.no_grad():
        ours.setup_caches(2, tokens.shape[1])
        steps = [ours(tokens[:, :width], input_pos=positions[:, :width], cache_pos=0, key_mask=key_mask)]
        steps += [ours(tokens[:, i:i + 1], input_pos=positions[:, i:i + 1], cache_pos=i, key_mask=key_mask)
                  for i in range(width, tokens.shape[1])]
        ours.reset_caches()
        got = torch.cat(steps, dim=1)
        for row, (n, seq) in enumerate(zip(lens, seqs)):
            want = ours(seq[None])[0]
            assert torch.isfinite(got[row]).all()
            assert (got[row, width - n:] - want).abs().max().item() <= TOLERANCE


def test_moe_block_equals_transformers_even_where_sigmoids_saturate():
    """Our MoE block with Llama 4's options against transformers' Llama4TextMoe, weights copied
    through the checkpoint layout, on router logits so large that their fp32 sigmoids are all
    1.0: the expert must still be the one with the largest logit."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from tunewright.models.llama4 import WEIGHTS
    from tunewright.models.registry import get_family

    args = get_family("llama4").tiny
    config = transformers.Llama4TextConfig(**{k: v for k, v in hf_config(args).items() if k != "architectures"})
    torch.manual_seed(0)
    theirs = Llama4TextMoe(config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.5)
        theirs.router.weight.abs_().mul_(100.0)  # positive logits of hundreds: all sigmoids 1.0 in fp32
    ours = build_model(args, device="cpu").layers[1].mlp
    hf_names = {f"model.layers.1.feed_forward.{k}": v for k, v in theirs.state_dict().items()}
    state = {}
    for name, tensor in hf_names.items():
        place = WEIGHTS.place(name)
        parts = tensor.split([ours.get_parameter(p.removeprefix("layers.1.mlp.")).shape[1] for p in place.ours],
                             dim=-1) if place.transposed else (tensor,)
        for our, part in zip(place.ours, parts):
            state[our.removeprefix("layers.1.mlp.")] = part.transpose(1, 2) if place.transposed else part
    ours.load_state_dict(state)
    x = torch.rand(3, 7, args.dim) + 0.1
    logits = ours.router(x.reshape(-1, args.dim))
    assert (torch.sigmoid(logits) == 1.0).all() and (logits.argmax(-1) != 0).any()  # ties, unless by logit
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x)[0].view_as(x), rtol=1e-5, atol=1e-5)
