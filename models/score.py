"""The score head: a reward or value model is the decoder with its language-model head replaced
by `nn.Linear(dim, num_labels, bias=False)`, read at each sequence's last real token.

    model = load_pretrained(path, num_labels=1)    # a causal LM gets a fresh head; a
                                                   # *ForSequenceClassification checkpoint its own
    scores = sequence_scores(model, batch)         # [rows, num_labels], at each row's last token

The head stays at `model.output` (so every transform, FSDP2's root and the trainable-weights
checkpoint treat it as the head) and `model.args.num_labels` records it. On disk it is Hugging
Face's sequence-classification layout: the family's `model.*` tensors, `score.weight`
[num_labels, dim] instead of `lm_head.weight`, and `architectures` (e.g.
`LlamaForSequenceClassification`), `num_labels`, `id2label`, `pad_token_id` in config.json, so
`transformers.AutoModelForSequenceClassification` loads it and we load it back.

A process reward model reads the same head at every token instead (`token_scores`, at the
step separators its labels mark): `model.args.score_per_token`, saved as transformers'
*ForTokenClassification (`LlamaForTokenClassification`), whose `score` is an `nn.Linear` with a
bias unless config.json says `token_classification_bias: false`, which ours says: one head, the
same bias-free `score.weight` for both kinds (a transformers without that key starts the bias
at zero, which gives the same scores).

A fresh head is drawn from normal(0, 1/sqrt(dim + 1)) (OpenAI's lm-human-preferences reward
head): the final norm leaves hidden states of about unit RMS, so initial scores have a standard
deviation near 1, where Bradley-Terry's sigmoid is neither flat nor saturated (HF's default,
std 0.02, starts every reward near 0 and every pair near ln 2 with tiny gradients for the body).
It comes from a generator seeded with the run's seed, so one device and FSDP2 draw the same
head without touching the global RNG that LoRA draws from next.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunewright.models.args import ModelArgs
from tunewright.models.weight_map import WeightMap

# Our family -> transformers' sequence-classification class. A family missing here has none
# (or none we checked against transformers), and asking for a score head on it is one line.
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3": "Gemma3TextForSequenceClassification",  # Gemma3ForSequenceClassification is multimodal
    "phi3": "Phi3ForSequenceClassification",
}
HEAD = "output.weight"  # our name of the head's weight, LM head or score head alike
HF_SCORE = "score.weight"
HF_LM_HEAD = "lm_head.weight"
_SUFFIX = "ForSequenceClassification"
_TOKEN_SUFFIX = "ForTokenClassification"


def classifier_architecture(family: str, *, per_token: bool = False) -> str:
    if family not in ARCHITECTURES:
        raise ValueError(f"model family '{family}' has no sequence-classification layout, so it cannot "
                         f"take a score head (reward/value model); families that can: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[family].replace(_SUFFIX, _TOKEN_SUFFIX) if per_token else ARCHITECTURES[family]


def is_token_classifier(config: dict[str, Any]) -> bool:
    return any(str(a).endswith(_TOKEN_SUFFIX) for a in config.get("architectures") or [])


def config_num_labels(config: dict[str, Any]) -> int | None:
    """The labels of a config.json that describes a *ForSequenceClassification (or
    *ForTokenClassification) model, else None. transformers counts `id2label` first and defaults
    to 2 when a config gives neither."""
    if not any(str(a).endswith(_SUFFIX) for a in config.get("architectures") or []) and not is_token_classifier(config):
        return None
    id2label = config.get("id2label")
    return len(id2label) if id2label else int(config.get("num_labels") or 2)


def check_num_labels(num_labels: Any) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive whole number (1 for a reward or value model), "
                         f"got {num_labels!r}")
    return num_labels


def with_num_labels(args: ModelArgs, num_labels: int | None, model_dir: Path) -> ModelArgs:
    """The args to build for `num_labels` asked of the checkpoint in `model_dir`: its own head
    (None asked), a fresh score head on a causal LM, or a ValueError when they disagree."""
    if num_labels is None:
        return args
    check_num_labels(num_labels)
    classifier_architecture(args.family)
    if args.num_labels is not None and args.num_labels != num_labels:
        raise ValueError(f"{model_dir / 'config.json'}: a score head of {args.num_labels} labels, but "
                         f"model.num_labels is {num_labels}; drop num_labels to keep the checkpoint's head")
    return args.replace(num_labels=num_labels)


def add_score_head(model: nn.Module, num_labels: int = 1) -> nn.Module:
    """Replace `model`'s LM head by a score head (uninitialised, on the head's device and in the
    embeddings' dtype; `init_score_head` or a checkpoint fills it), in place. transformers'
    classifier applies no logit soft-cap (Gemma-2), so neither do we."""
    check_num_labels(num_labels)
    classifier_architecture(model.args.family)
    emb = model.tok_embeddings.weight
    with torch.device("meta"):  # no init here: it would draw from the global RNG
        head = nn.Linear(model.args.dim, num_labels, bias=False, dtype=emb.dtype)
    model.output = head.to_empty(device=emb.device)
    model.final_logit_softcap = None
    model.args = model.args.replace(num_labels=num_labels)
    return model


def initial_score_weight(num_labels: int, dim: int) -> torch.Tensor:
    """A fresh head's weight [num_labels, dim], fp32 on the CPU (see the module docstring)."""
    gen = torch.Generator().manual_seed(torch.initial_seed())
    return torch.randn(num_labels, dim, generator=gen) / math.sqrt(dim + 1)


def fresh_score_weights(model: nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """{our name: initial value} of the score head when `model` has one and the checkpoint in
    `model_dir` does not (a reward model started from a causal LM); else empty."""
    from tunewright.models.registry import read_config

    labels = getattr(model.args, "num_labels", None)
    if labels is None or config_num_labels(read_config(model_dir)) is not None:
        return {}
    return {HEAD: initial_score_weight(labels, model.args.dim)}


@functools.cache
def _score_map(weights: WeightMap) -> WeightMap:
    pairs = [(HF_SCORE if hf == HF_LM_HEAD else hf, ours) for hf, ours in weights.pairs]
    # A causal LM's head is never read into a score head (it is built fresh instead).
    return WeightMap(pairs, fused=weights.fused, experts=weights.experts, aliases=weights.aliases,
                     skip=(*weights.skip, HF_LM_HEAD))


def weight_map(weights: WeightMap, num_labels: int | None) -> WeightMap:
    """The family's weight map, or its sequence-classification variant (`score.weight`)."""
    return weights if num_labels is None else _score_map(weights)


def classification_config(config: dict[str, Any], args: ModelArgs, source_dir: Path | None) -> dict[str, Any]:
    """config.json of a model with a score head: transformers' class, its labels, and the pad id
    it finds each row's last token by (the source's, else its tokenizer's)."""
    n = args.num_labels
    assert n is not None
    labels = {str(i): f"LABEL_{i}" for i in range(n)}
    pad = config.get("pad_token_id")
    if pad is None and source_dir is not None:
        pad = _tokenizer_pad_id(source_dir)
    out = {**config, "architectures": [classifier_architecture(args.family, per_token=args.score_per_token)],
           "num_labels": n, "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}, "pad_token_id": pad}
    if args.score_per_token:
        out["token_classification_bias"] = False  # our head has none (module docstring)
    return out


def _tokenizer_pad_id(model_dir: Path) -> int | None:
    """The pad id our tokenizer loader gives the directory's tokenizer (what training padded
    with), or None when it holds no tokenizer."""
    from tunewright.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_dir).pad_id
    except (ValueError, OSError):
        return None


def require_score_head(model_cfg: dict[str, Any], *, num_labels: int = 1, what: str = "a reward model") -> None:
    """ValueError (one line, before any weight loads) unless the `model` node gives a model with
    a score head of `num_labels`: its checkpoint has one, or the node asks for one."""
    from tunewright.models.registry import model_args

    path = model_cfg.get("path")
    if path is None:
        raise ValueError(f"model: {what} loads a Hugging Face directory; set model.path "
                         f"(_component_: tunewright.models.load_pretrained)")
    family, args = model_args(path)
    classifier_architecture(family.name)
    asked = model_cfg.get("num_labels")
    labels = args.num_labels if asked is None else asked
    if labels is None:
        raise ValueError(f"model: {path} is a causal language model ({family.architecture}) with no score "
                         f"head; {what} needs one: add `num_labels: {num_labels}` to the model node (a fresh "
                         f"head replaces the LM head), or load a *ForSequenceClassification checkpoint")
    if labels != num_labels:
        raise ValueError(f"model: {what} has a score head of {num_labels} label(s), but the model has "
                         f"{labels} (model.num_labels or {path}/config.json)")
    with_num_labels(args, asked, Path(path))


def sequence_scores(model: nn.Module, batch: dict[str, Any], *, padding_free: bool = True) -> torch.Tensor:
    """The score head at each row's last real token: [rows, num_labels] float32 (differentiable).

    The last token is found by position, from the rows' lengths (`seq_lens`, host ints: no
    device sync), never by comparing with the pad id, which tokenizers often share with eos:
    row i's last token is at seq_lens[i] - 1 of a padded batch, and at seq_lens[0] + ... +
    seq_lens[i] - 1 of a padding-free one (rows end to end). Packed rows hold several sequences
    and have no single score."""
    from tunewright.modules.precision import compute_autocast
    from tunewright.training.objectives import hidden_states

    if getattr(model.args, "num_labels", None) is None:
        raise ValueError("the model has no score head (a causal LM); load it with model.num_labels: 1")
    lengths = [int(n) for n in batch.get("seq_lens", ())]
    num_rows = int(batch.get("num_rows", batch["labels"].shape[0]))
    if "doc_ids" in batch or len(lengths) != num_rows or min(lengths, default=0) < 1:
        raise ValueError("scores are read at each row's last token: the batch needs one sequence per row, "
                         "each of at least one token (`seq_lens`; packed rows hold several)")
    with compute_autocast(model, batch["tokens"].device):  # the head too, under mixed precision
        hidden, _, _ = hidden_states(model, batch, padding_free=padding_free)
        if hidden.shape[0] == 1 and hidden.shape[1] == sum(lengths):  # padding-free: [1, T]
            h = hidden[0, torch.tensor(lengths).cumsum(0).to(hidden.device) - 1]  # [rows, dim]
        else:  # padded: [rows, s, dim]
            h = hidden[torch.arange(num_rows, device=hidden.device), torch.tensor(lengths, device=hidden.device) - 1]
        return model.head(h).float()


def score_per_token(model: nn.Module) -> nn.Module:
    """Mark `model`'s score head as read at every token (a PRM), so it saves as transformers'
    *ForTokenClassification. Call it before `Placement.load_model` copies the model's shape
    for sharded saving, i.e. inside `adapt`, or on a model that one device holds."""
    classifier_architecture(model.args.family)
    model.args = model.args.replace(score_per_token=True)
    return model


def token_scores(model: nn.Module, batch: dict[str, Any], *, padding_free: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the score head at each labelled position [num_targets, num_labels] float32,
    differentiable; those labels [num_targets]). Only labelled positions go through the head:
    a PRM's labels sit on its step separators, a few tokens per row."""
    from tunewright.data.tokenizer.base import IGNORE_INDEX
    from tunewright.modules.precision import compute_autocast
    from tunewright.training.objectives import hidden_states

    if getattr(model.args, "num_labels", None) is None:
        raise ValueError("the model has no score head (a causal LM); load it with model.num_labels: 2")
    with compute_autocast(model, batch["tokens"].device):
        hidden, labels, _ = hidden_states(model, batch, padding_free=padding_free)
        index = batch.get("target_index")  # host-made by collate_flat: no device sync
        if index is None or labels.shape[0] != 1:
            index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # [num_targets]
        h = hidden.reshape(-1, hidden.shape[-1])[index]  # [num_targets, dim]
        return model.head(h).float(), labels.reshape(-1)[index]
