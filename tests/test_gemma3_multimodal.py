"""The text model of multimodal Gemma-3 checkpoints (Gemma3ForConditionalGeneration, as Gemma-3
4B/12B/27B ship) against transformers: loaded from `language_model.*` beside a vision tower,
read from a sparse `text_config`, and saved as a text-only checkpoint Gemma3ForCausalLM loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.hf_reference import TOLERANCE, VOCAB, assert_saved_reloads, max_logit_diff, random_tokens
from tunewright.models import load_pretrained
from tunewright.models.registry import family_for_config, get_family

transformers = pytest.importorskip("transformers")

SEQ = 40  # past the sliding window of 6
TEXT = dict(  # 2 local + 1 global layer, linear RoPE scaling on the global one (as in 4B)
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
    num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
VISION = dict(model_type="siglip_vision_model", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
              num_attention_heads=2, image_size=28, patch_size=14)
# The text_config of google/gemma-3-4b-it and gemma-3-27b-it as published: only what differs
# from Gemma3TextConfig's defaults.
RELEASED_TEXT = {
    "gemma3_4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024,
                      rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    "gemma3_12b": dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                       num_hidden_layers=48, num_key_value_heads=8, sliding_window=1024,
                       rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    "gemma3_27b": dict(head_dim=128, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
                       num_hidden_layers=62, num_key_value_heads=16, query_pre_attn_scalar=168,
                       sliding_window=1024, rope_scaling={"factor": 8.0, "rope_type": "linear"}),
}


def _multimodal(tmp_path: Path, text: dict, **top) -> tuple[torch.nn.Module, Path]:
    """A random Gemma3ForConditionalGeneration (norms perturbed, q/k scaled so that windows and
    RoPE show in the logits), saved by transformers."""
    cfg = transformers.Gemma3Config(text_config={"model_type": "gemma3_text", **text}, vision_config=VISION,
                                    mm_tokens_per_image=4, **top)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")) and "language_model" in name:
                p.mul_(8.0)
    out = tmp_path / "mm"
    model.save_pretrained(out)
    return model, out


def _stored_names(model_dir: Path) -> list[str]:
    names = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names += list(st.keys())
    return names


@pytest.mark.parametrize("top", [{}, {"tie_word_embeddings": False}], ids=["tied", "untied"])
def test_text_logits_match_the_multimodal_model(tmp_path, top):
    hf_model, hf_dir = _multimodal(tmp_path, TEXT, **top)
    names = _stored_names(hf_dir)
    # transformers 5 holds `model.language_model.*` but saves the Hub's `language_model.model.*`.
    assert any(n.startswith("language_model.model.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names)
    assert ("language_model.lm_head.weight" in names) == bool(top)
    ours = load_pretrained(hf_dir)
    assert ours.args.tie_embeddings == (not top)
    # Text-only tokens: no image token, so the multimodal model is a causal text decoder.
    assert max_logit_diff(hf_model, ours, random_tokens(2, SEQ)) <= TOLERANCE


def test_transformers_in_memory_names_load(tmp_path):
    """A raw state-dict dump (`model.language_model.*`, `model.vision_tower.*`, `lm_head`)."""
    hf_model, hf_dir = _multimodal(tmp_path, TEXT)
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "config.json").write_text((hf_dir / "config.json").read_text())
    state = {n: t.detach().clone() for n, t in hf_model.state_dict().items()}
    assert any(n.startswith("model.language_model.") for n in state)
    save_file(state, str(dump / "model.safetensors"))
    assert max_logit_diff(hf_model, load_pretrained(dump), random_tokens(2, SEQ)) <= TOLERANCE


def test_a_tensor_under_both_layouts_is_refused(tmp_path):
    _, hf_dir = _multimodal(tmp_path, TEXT)
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        state = {n: f.get_tensor(n) for n in f.keys()}
    state["model.language_model.norm.weight"] = state["language_model.model.norm.weight"].clone()
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="norm.weight' is stored twice"):
        load_pretrained(hf_dir)


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one_file", "sharded"])
def test_saved_text_only_checkpoint_loads_in_gemma3_for_causal_lm(tmp_path, shard):
    hf_model, hf_dir = _multimodal(tmp_path, TEXT)
    if shard:
        for f in hf_dir.glob("*.safetensors"):
            f.unlink()
        hf_model.save_pretrained(hf_dir, max_shard_size=shard)
    (hf_dir / "tokenizer_config.json").write_text("{}")  # stands for the tokenizer files
    ours = load_pretrained(hf_dir)
    # Changes our weights, saves with source_dir, reloads in Gemma3ForCausalLM: equal logits.
    assert_saved_reloads(tmp_path, ours, hf_dir, "Gemma3ForCausalLM", seq=SEQ)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    names = _stored_names(out)
    assert names and all(n.startswith("model.") for n in names)  # no vision tower, no prefix
    assert (out / "tokenizer_config.json").is_file()
    if shard:  # the source's shard files, those that held text tensors
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        source = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) > 1 and set(index.values()) <= set(source.values())


def test_sparse_text_config_takes_gemma3_text_defaults(tmp_path):
    """Only sizes and window given, as in the released configs: vocabulary, heads, head_dim,
    query scale, RoPE bases and tying come from Gemma3TextConfig's defaults."""
    sparse = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, sliding_window=5,
                  rope_scaling={"factor": 8.0, "rope_type": "linear"})
    hf_model, hf_dir = _multimodal(tmp_path, sparse)
    config = json.loads((hf_dir / "config.json").read_text())
    # transformers writes every key; the Hub's configs do not.
    config["text_config"] = {"model_type": "gemma3_text", **sparse}
    (hf_dir / "config.json").write_text(json.dumps(config))
    reference = hf_model.config.text_config
    ours = load_pretrained(hf_dir)
    assert (ours.args.vocab_size, ours.args.num_heads, ours.args.resolved_head_dim) == (
        reference.vocab_size, reference.num_attention_heads, reference.head_dim)
    assert max_logit_diff(hf_model, ours, random_tokens(1, 12)) <= TOLERANCE


@pytest.mark.parametrize("size", list(RELEASED_TEXT))
def test_released_configs_read_as_our_size_rows(size):
    """The published multimodal config.json gives our size row, and transformers' text model of
    it has the parameter count that row promises."""
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", **RELEASED_TEXT[size]}, "vision_config": VISION}
    family = family_for_config(config, "config.json")
    args = family.args_from_hf(config)
    assert args == get_family("gemma3").sizes[size]
    text = transformers.Gemma3Config(**{k: v for k, v in config.items() if k != "architectures"}).text_config
    with torch.device("meta"):
        reference = transformers.Gemma3ForCausalLM(text)
    assert sum(p.numel() for p in reference.parameters()) == args.num_params()
