"""Our adapters in PEFT's format: loaded by `peft` on the `transformers` model with the same
logits, PEFT's adapters loaded by us, and mismatches refused in one line."""

from __future__ import annotations

import pytest
import torch

from tunewright.models import load_pretrained, save_pretrained
from tunewright.models.peft_adapter import load_peft_adapter, save_peft_adapter
from tunewright.modules.peft.apply import adapter_state_dict, apply_lora, merge_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 101, (2, 14), generator=torch.Generator().manual_seed(0))


def hf_base(tmp_path, name="base", hidden=64):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
    return tmp_path / name


def fresh_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_peft_loads_our_adapter_with_equal_logits(tmp_path, kind):
    base = hf_base(tmp_path)
    ours = load_pretrained(base)
    apply_lora(ours, targets=["q", "k", "v", "o", "gate", "up", "down", "output"], rank=4, alpha=8,
               use_rslora=kind == "rslora", use_dora=kind == "dora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in adapter_state_dict(ours).items():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_path=str(base))
    theirs = peft.PeftModel.from_pretrained(fresh_hf(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = theirs(TOKENS).logits
        got = ours(TOKENS)
    assert (got - want).abs().max().item() <= 1e-4
    assert (want - fresh_hf(base)(TOKENS).logits).abs().max().item() > 1e-3  # the adapter matters

    # our merged output loads in transformers with the same logits
    merge_lora(ours)
    save_pretrained(ours, tmp_path / "merged", source_dir=base)
    with torch.no_grad():
        assert (fresh_hf(tmp_path / "merged")(TOKENS).logits - want).abs().max().item() <= 1e-4


def test_we_load_an_adapter_saved_by_peft(tmp_path):
    base = hf_base(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False, use_dora=True)  # random B: a non-trivial adapter
    torch.manual_seed(2)
    theirs = peft.get_peft_model(fresh_hf(base), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = load_peft_adapter(load_pretrained(base), tmp_path / "peft_adapter")
    with torch.no_grad():
        assert (ours(TOKENS) - theirs(TOKENS).logits).abs().max().item() <= 1e-4


def test_adapter_for_another_base_is_refused(tmp_path):
    small = load_pretrained(hf_base(tmp_path, "small", hidden=64))
    apply_lora(small, targets=["q"], rank=2, alpha=4)
    save_peft_adapter(small, tmp_path / "adapter")
    other = load_pretrained(hf_base(tmp_path, "big", hidden=128))
    with pytest.raises(ValueError, match=r"adapter does not match the base model: .* has shape \(2, 64\), "
                                         r"the model needs \(2, 128\)"):
        load_peft_adapter(other, tmp_path / "adapter")
