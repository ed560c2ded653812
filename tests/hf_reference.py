"""Shared steps of the "our model equals transformers' model" tests of every family.

A family test builds a random tiny transformers model of its class, saves it, loads it with
`load_pretrained` (through the family's real weight map) and compares logits; then saves ours
and reloads that in transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 101
TOLERANCE = 1e-4


def make_hf_model(tmp_path: Path, config_cls: str, model_cls: str, *, seed: int = 0, **config):
    """A random transformers model (norms and biases perturbed so they are tested), saved."""
    import transformers

    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 (or 0) and biases to 0: randomise both
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    return model, out


def random_tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(hf_model, ours, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape
    return (got - want).abs().max().item()


def assert_saved_reloads(tmp_path: Path, ours, source_dir: Path, model_cls: str, *, seq: int = 33) -> None:
    """Change our weights, save with `save_pretrained`, reload in transformers: equal logits."""
    import transformers

    from tunewright.models import save_pretrained

    with torch.no_grad():  # a stale copy of the source would be caught
        for p in ours.parameters():
            p.mul_(1.5)
    save_pretrained(ours, tmp_path / "out", source_dir=source_dir)
    reloaded = getattr(transformers, model_cls).from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert max_logit_diff(reloaded, ours, random_tokens(1, seq, seed=2)) <= TOLERANCE
