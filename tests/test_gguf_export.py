"""GGUF export against references: llama.cpp's own tensor-name table (gguf-py's TensorNameMap)
and its converter's weight transforms, our importer (F32 bitwise, F16 by rounding), and
transformers' GGUF loader, which must run our export with our model's logits.

Tiny random models per family, each with random norms and biases (so the Gemma norm shift and
the q/k permutation of biases show). transformers' GGUF loader reads fewer keys than
llama.cpp: it has no Gemma-1 or Mixtral (llama arch with experts) support, so those two are
checked through our reader against llama.cpp's transforms only; for the others the tiny rows
are reshaped to what it can express (noted per family in `LOADABLE`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from test_gguf import permute  # noqa: E402  (llama.cpp's LlamaModel.permute)

from tunewright.data.tokenizer import load_tokenizer  # noqa: E402
from tunewright.models import load_pretrained  # noqa: E402
from tunewright.models.args import FULL, SLIDING  # noqa: E402
from tunewright.models.builder import init_weights  # noqa: E402
from tunewright.models.gguf_export import export_gguf  # noqa: E402
from tunewright.models.gguf_file import read_gguf  # noqa: E402
from tunewright.models.gguf_import import gguf_to_hf  # noqa: E402
from tunewright.models.pretrained import build_model, iter_hf_tensors, save_pretrained  # noqa: E402
from tunewright.models.registry import get_family  # noqa: E402
from tunewright.training.tiny_assets import make_tiny_model  # noqa: E402

TEXTS = ["Hello world", "<|im_start|>user\nhi 42<|im_end|>", "a  b\t\tc\n\nd", "héllo — ünïcode ✓"]
ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}
# family -> tiny-row changes so that transformers' GGUF loader, which reads fewer keys than
# llama.cpp, builds the same model (its defaults fill what it does not read).
LOADABLE = {
    "llama": dict(intermediate_dim=80),  # ffn_down rows of 80: Q8_0 falls back to F16 there
    "mistral": dict(sliding_window=None),  # no window in llama.cpp's llama arch
    "qwen2": dict(sliding_window=None, layer_types=None),
    "qwen3": dict(head_dim=128),  # no head_dim read: Qwen3Config's 128
    "qwen3_moe": dict(dense_layers=(), expert_dim=768),  # no moe_intermediate_size read: 768
    "phi3": dict(rotary_dim=None, sliding_window=None, rope_scaling=None),  # none of them read
    # query_pre_attn_scalar is not read (256): head_dim 256 makes it llama.cpp's 1/sqrt(head_dim)
    "gemma2": dict(head_dim=256, attn_scale=256**-0.5),
    # No rope scaling read; 3 sliding layers (the fixed 5:1 pattern's first): with 6 layers the
    # F16 logits were 1.2e-3 off, all of it F16 rounding (0.0 against F16-rounded weights).
    "gemma3": dict(head_dim=256, attn_scale=256**-0.5, rope_scaling=None, layer_types=(SLIDING,) * 3),
}
# The other families' rows as llama.cpp can represent them (exported and checked via our reader).
READER_ONLY = {"gemma": {}, "mixtral": {}}


def tiny_dir(root: Path, family: str, **changes) -> Path:
    """A random tiny `family` model with the tiny byte-level tokenizer, norms and biases random."""
    # The folder is general.name: transformers' loader takes a name with "mistral" for its
    # mistral architecture, which gguf-py 0.19 does not know (a Mistral GGUF fails there).
    out = root / family.replace("mistral", "m7b")
    make_tiny_model(out, family)  # tokenizer files; the weights are replaced below
    args = get_family(family).tiny.replace(**changes)
    model = build_model(args, device="cpu")
    init_weights(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_pretrained(model, out, dtype=torch.float32, overwrite=True)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: tiny_dir(root, f, **changes) for f, changes in {**LOADABLE, **READER_ONLY}.items()}


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: t for _, name, t in iter_hf_tensors(model_dir)}


def llama_cpp_tensors(model_dir: Path, arch_name: str) -> dict[str, np.ndarray]:
    """What llama.cpp's converter writes for `model_dir` in F32: its own name table, q/k rows
    permuted for llama-arch models, Gemma norms + 1, experts stacked."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in hf_tensors(model_dir).items():
        a = t.float().numpy()
        base, kind = name.rsplit(".", 1)
        parts = base.split(".")
        expert = None
        if "experts" in parts:  # llama.cpp stacks experts, then maps the merged name
            expert = int(parts[parts.index("experts") + 1])
            del parts[parts.index("experts") + 1]
        gname = names.get_name(".".join(parts))
        assert gname is not None, name
        gname = f"{gname}.{kind}"
        if arch_name == "llama" and ".attn_q." in gname:
            a = permute(a, heads)
        elif arch_name == "llama" and ".attn_k." in gname:
            a = permute(a, kv_heads)
        if arch_name.startswith("gemma") and name.endswith("norm.weight"):
            a = a + np.float32(1)
        if expert is None:
            out[gname] = a
        else:
            experts.setdefault(gname, {})[expert] = a
    out.update({n: np.stack([e[i] for i in sorted(e)]) for n, e in experts.items()})
    if config.get("tie_word_embeddings"):
        out.pop("output.weight", None)
    return out


# -- every family: llama.cpp's names and transforms, read back by our reader ----------------------


@pytest.mark.parametrize("family", list(ARCH))
def test_f32_export_is_what_llama_cpp_writes(tmp_path, dirs, family):
    out = export_gguf(dirs[family], "f32", tmp_path / "m.gguf")
    g = read_gguf(out)
    m = g.metadata
    assert m["general.architecture"] == ARCH[family] and m["general.file_type"] == gguf.LlamaFileType.ALL_F32
    want = llama_cpp_tensors(dirs[family], ARCH[family])
    assert set(g.tensors) - {"rope_freqs.weight"} == set(want)
    for name, values in want.items():
        assert g.tensors[name].type_name == "F32"
        assert np.array_equal(g.tensor(name), values), name  # bitwise
    config = json.loads((dirs[family] / "config.json").read_text())
    arch = ARCH[family]
    assert (m[f"{arch}.block_count"], m[f"{arch}.embedding_length"], m[f"{arch}.attention.head_count"],
            m[f"{arch}.attention.head_count_kv"]) == (config["num_hidden_layers"], config["hidden_size"],
                                                       config["num_attention_heads"], config["num_key_value_heads"])
    assert m[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert len(m["tokenizer.ggml.tokens"]) == config["vocab_size"] == 288
    assert m["tokenizer.ggml.eos_token_id"] == 258 and m["tokenizer.ggml.padding_token_id"] == 256
    assert m["tokenizer.ggml.token_type"][256:260] == [3, 3, 3, 5]  # specials CONTROL, padding UNUSED
    assert not list(tmp_path.glob(".*"))  # no temporary left


# -- our importer: the same tensors and tokenizer ------------------------------------------------


@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_our_importer_gives_back_the_model(tmp_path, dirs, out_type):
    source = dirs["llama"]
    back = gguf_to_hf(export_gguf(source, out_type, tmp_path / "m.gguf"), tmp_path / "back")
    original, restored = hf_tensors(source), hf_tensors(back)
    assert set(restored) == set(original)
    for name, t in original.items():
        want = t if out_type == "f32" or t.ndim == 1 else t.half().float()  # F16 rounds 2-D weights
        assert torch.equal(restored[name], want), name
    ours, theirs = load_tokenizer(source), load_tokenizer(back)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text), text
    assert (theirs.eos_id, theirs.pad_id, theirs.bos_id) == (ours.eos_id, ours.pad_id, ours.bos_id)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert theirs.tokenize_messages(messages) == ours.tokenize_messages(messages)



def test_llama3_rope_scaling_round_trips_through_rope_freqs(tmp_path):
    """Llama-3.1 rope scaling goes as llama.cpp's `rope_freqs` tensor; our importer recovers the
    HF dict from it (checking the tensor against Meta's formula) and the model computes the same."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    source = tiny_dir(tmp_path, "llama", rope_base=500000.0, rope_scaling=scaling, max_seq_len=131072)
    back = gguf_to_hf(export_gguf(source, "f32", tmp_path / "m.gguf"), tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_scaling"] == scaling
    tokens = torch.randint(0, 288, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_pretrained(back)(tokens), load_pretrained(source)(tokens))


def test_phi3_longrope_partial_rotary_and_window(tmp_path):
    """The tiny Phi-3 row's LongRoPE, partial rotary and window, as llama.cpp's Phi3MiniModel
    writes them: factor tensors, rope.dimension_count, the original context and attn_factor."""
    args = get_family("phi3").tiny
    g = read_gguf(export_gguf(tiny_dir(tmp_path, "phi3"), "f16", tmp_path / "m.gguf"))
    m, s = g.metadata, args.rope_scaling
    assert (m["phi3.rope.dimension_count"], m["phi3.attention.sliding_window"]) == (24, 48)
    # llama.cpp runs Phi-3 without its window: the declared context stops at the window (48).
    assert (m["phi3.context_length"], m["phi3.rope.scaling.original_context_length"]) == (48, 32)
    assert m["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(512 / 32) / math.log(32)))
    assert np.array_equal(g.tensor("rope_factors_long.weight"), np.float32(s["long_factor"]))
    assert np.array_equal(g.tensor("rope_factors_short.weight"), np.float32(s["short_factor"]))
    assert g.tensors["rope_factors_long.weight"].type_name == "F32"

# -- transformers' GGUF loader runs the export like our model --------------------------------------


def q8_0_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the weights a Q8_0 file holds, by llama.cpp's rules: 1-D tensors and the MoE
    router stay F32, rows that are not whole 32-value blocks go F16 (rounding runs along rows,
    so it commutes with the q/k row permutation and the fused/stacked layouts)."""
    Q = gguf.GGMLQuantizationType
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "router" in name:
                continue
            a = p.numpy()
            if a.shape[-1] % 32:
                p.copy_(torch.from_numpy(a.astype(np.float16).astype(np.float32)))
            else:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0)))
    return model


@pytest.mark.parametrize("family", list(LOADABLE))
def test_transformers_gguf_loader_matches_our_model(tmp_path, dirs, family):
    """F16: within 1e-3 of our model. Q8_0: the same as our model with Q8_0-rounded weights;
    top-1 agreement with the unrounded model is measured on the real SmolLM2 (test_quickstart):
    a random tiny model's logits are near ties, where 8-bit rounding flips 2-3% of its argmaxes."""
    ours = load_pretrained(dirs[family], dtype="fp32").eval()
    tokens = torch.randint(0, 288, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ours(tokens)
        want_q8_0 = q8_0_rounded(ours)(tokens)
    for out_type, reference, tolerance in (("f16", want, 1e-3), ("q8_0", want_q8_0, 1e-4)):
        out = export_gguf(dirs[family], out_type, tmp_path / f"{family}-{out_type}.gguf")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
        with torch.no_grad():
            got = model(tokens).logits.float()
        assert (got - reference).abs().max().item() <= tolerance, (family, out_type)
        if out_type == "q8_0":  # measured, for the report: near-tied random logits flip under 8 bits
            print(f"{family} Q8_0 top-1 agreement {(got.argmax(-1) == want.argmax(-1)).float().mean():.3f}")


def test_q8_0_types_and_file_type(tmp_path, dirs):
    g = read_gguf(export_gguf(dirs["llama"], "q8_0", tmp_path / "m.gguf"))
    assert g.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {name: t.type_name for name, t in g.tensors.items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80: not whole 32-value blocks
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    bf16 = read_gguf(export_gguf(dirs["llama"], "bf16", tmp_path / "b.gguf"))
    assert bf16.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert bf16.tensors["blk.0.attn_q.weight"].type_name == "BF16"


# -- the recipes' export_gguf option ---------------------------------------------------------------


def test_recipe_option_exports_the_final_model(tmp_path, dirs):
    from types import SimpleNamespace

    from tunewright.training.gguf_export import gguf_export_step

    def cfg(model_dir: Path) -> SimpleNamespace:
        return SimpleNamespace(export_gguf="q8_0", model={"path": str(model_dir)}, lora_rank=None,
                               save_final_model=None, quantization=None)

    run = SimpleNamespace(output_dir=tmp_path / "run")
    shutil.copytree(dirs["llama"], run.output_dir / "final")
    out = gguf_export_step(cfg(dirs["llama"]))(None, None, run)
    assert out == run.output_dir / "final-q8_0.gguf" and read_gguf(out).metadata["general.file_type"] == 7
    moe = tiny_dir(tmp_path, "qwen3_moe")  # a dense first block: refused before any training
    with pytest.raises(ValueError, match="export_gguf: .*dense MLP blocks \\[0\\]"):
        gguf_export_step(cfg(moe))


# -- bad inputs: one line, nothing written ---------------------------------------------------------


def expect_error(model_dir: Path, out: Path, match: str, out_type: str = "f16") -> None:
    with pytest.raises(ValueError, match=match) as e:
        export_gguf(model_dir, out_type, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("family, changes, match", [
    ("gemma2", dict(attn_scale=24**-0.5), "query scale 0.204124 .*llama.cpp's 'gemma2' cannot represent it"),
    ("gemma3", dict(attn_scale=None, layer_types=(SLIDING, FULL, SLIDING)), "other than every 6th layer global"),
    ("qwen3_moe", dict(norm_topk_prob=False, dense_layers=()), "norm_topk_prob=false"),
    ("qwen2", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "rope scaling 'llama3'"),
    ("llama", dict(mlp_bias=True), "MLP biases"),
])
def test_models_llama_cpp_cannot_represent(tmp_path, family, changes, match):
    expect_error(tiny_dir(tmp_path, family, **changes), tmp_path / "m.gguf", match)


def test_bad_inputs(tmp_path, dirs):
    expect_error(dirs["llama"], tmp_path / "m.gguf", "GGUF output type 'q4_0' is not one we write", "q4_0")
    expect_error(tmp_path / "nowhere", tmp_path / "m.gguf", "model directory not found")
    broken = tmp_path / "broken"
    shutil.copytree(dirs["llama"], broken)
    tok = json.loads((broken / "tokenizer.json").read_text())
    # Digit runs kept whole, then GPT-2's split: our tokenizer reads it, llama.cpp has no name for it.
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, tok["pre_tokenizer"]]}
    (broken / "tokenizer.json").write_text(json.dumps(tok))
    expect_error(broken, tmp_path / "m.gguf", "tokenizer.json: this pre-tokenizer has no llama.cpp name")
    (tmp_path / "exists.gguf").write_text("x")
    with pytest.raises(ValueError, match="exists.gguf: already exists"):
        export_gguf(dirs["llama"], "f16", tmp_path / "exists.gguf")


def test_cli(tmp_path, dirs, capsys):
    from tunewright.tune_cli.main import main as tune

    assert tune(["export-gguf", str(dirs["qwen3"]), "--out-type", "bf16", "--output", str(tmp_path / "q.gguf")]) == 0
    assert read_gguf(tmp_path / "q.gguf").metadata["general.architecture"] == "qwen3"
    capsys.readouterr()
    assert tune(["export-gguf", str(dirs["qwen3"]), "--out-type", "q4_k", "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'q4_k' is not one we write" in err


def test_sentencepiece_tokenizer(tmp_path):
    """A SentencePiece tokenizer.model (Mistral v0.1's) as llama.cpp's `llama` vocabulary: pieces,
    scores and types as sentencepiece reports them, and transformers' GGUF tokenizer, built from
    the file's metadata alone, encodes as our tokenizer of the original directory."""
    import sentencepiece
    from tok_assets import MISTRAL_V1, package_file

    model_dir = tiny_dir(tmp_path, "mistral", vocab_size=32000, sliding_window=None)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (model_dir / name).unlink()
    shutil.copy(package_file("mistral_common", MISTRAL_V1), model_dir / "tokenizer.model")
    out = export_gguf(model_dir, "f16", tmp_path / "sp.gguf")
    m = read_gguf(out).metadata
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.add_bos_token"] is True
    assert m["tokenizer.ggml.add_space_prefix"] is True  # "a" -> "▁a", as llama.cpp assumes by default
    assert m["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(32000)]
    assert np.allclose(m["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(32000)])
    assert m["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (1, 2)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = load_tokenizer(model_dir)
    for text in ["Hello world", "The capital of France is Paris.", "héllo — ünïcode ✓ 12345"]:
        assert hf.encode(text) == ours.encode(text, add_bos=True), text


# -- the real SmolLM2 after the quickstart (called by test_quickstart's slow run) ------------------

PARIS_TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. It is 330 metres tall and "
              "was the tallest man-made structure in the world until 1930. Millions of people visit it "
              "every year, and it has become a symbol of France.")


def check_exported_smollm2(merged: Path, work: Path) -> None:
    """The quickstart's fine-tuned SmolLM2 (in `work`) as a Q8_0 GGUF, read by transformers'
    GGUF loader (weights, tokenizer and chat template from the file alone): its greedy answer
    still names Paris; its logits are our model's on Q8_0-rounded weights; its next tokens agree
    with our unrounded model's on >= 99% of the quickstart's held-out rows (measured 99.6%; on
    plain prose 97.2-97.5%, where this 135M model's choices are closer calls)."""
    out = export_gguf(merged, "q8_0", work / "smollm2-q8_0.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(work, gguf_file=out.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name).eval()
    ours_tok = load_tokenizer(merged)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == ours_tok.tokenize_messages(messages, add_generation_prompt=True)[0]
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(answer), tok.decode(answer)

    ours = load_pretrained(merged, dtype="fp32").eval()
    rows = [json.loads(line) for line in (work / "data" / "eval.jsonl").read_text().splitlines()[:8]]
    held_out = torch.tensor([sum((ours_tok.tokenize_messages(r["messages"])[0] for r in rows), [])])
    text = torch.tensor([ours_tok.encode(PARIS_TEXT)])
    with torch.no_grad():
        agree = (model(held_out).logits.argmax(-1) == ours(held_out).argmax(-1)).float().mean().item()
        got, want = model(text).logits, q8_0_rounded(ours)(text)
    assert agree >= 0.99, agree
    assert (got - want).abs().max().item() <= 1e-4  # measured 0.0
