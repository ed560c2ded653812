"""Mistral 7B: Llama's decoder with an optional sliding window on every layer. Only data here.

v0.1 attends to the last 4,096 positions on every layer; v0.2/v0.3 dropped the window
(`sliding_window: null`) and raised the RoPE base. Transformers applies the window whenever
config.json sets one, so we do too (`ModelArgs.sliding_window`, all layers sliding).
"""

from __future__ import annotations

from typing import Any

from tunewright.models import llama
from tunewright.models.args import ModelArgs
from tunewright.models.family import Family

# mistralai/Mistral-7B-v0.3 (and -Instruct-v0.3): 32,768-token vocabulary, no window.
_M = ModelArgs(family="mistral", vocab_size=32768, dim=4096, num_layers=32, num_heads=32,
               num_kv_heads=8, intermediate_dim=14336, head_dim=128, rope_base=1000000.0,
               max_seq_len=32768, norm_eps=1e-5)

SIZES: dict[str, ModelArgs] = {
    "mistral_7b": _M,
    "mistral_7b_v0_1": _M.replace(vocab_size=32000, rope_base=10000.0, sliding_window=4096),
}

# The same tensor names as Llama (Mistral checkpoints have no biases, so those rules never fire).
WEIGHTS = llama.WEIGHTS


def args_from_hf(c: dict[str, Any]) -> ModelArgs:
    return llama.args_from_hf(c).replace(
        family="mistral", sliding_window=c.get("sliding_window") or None)


def hf_config(a: ModelArgs) -> dict[str, Any]:
    if a.attn_bias or a.mlp_bias or a.layer_types is not None:
        raise ValueError("mistral checkpoints have no biases and one sliding window for every "
                         "layer; this model differs")
    config = {k: v for k, v in llama.hf_config(a).items() if k not in ("attention_bias", "mlp_bias")}
    return {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "sliding_window": a.sliding_window}


FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    architecture="MistralForCausalLM",
    sizes=SIZES,
    weight_map=WEIGHTS,
    args_from_hf=args_from_hf,
    hf_config=hf_config,
    # GQA, an untied head and a window shorter than the test sequences, so it really slides.
    tiny=ModelArgs(family="mistral", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_dim=256, max_seq_len=2048, norm_eps=1e-5,
                   sliding_window=24),
)
