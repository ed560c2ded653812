"""Rotary position embeddings in the Hugging Face layout ("rotate_half": the two halves of each
head are the real and imaginary parts), so HF q/k weights load with no permutation; Meta's
complex form (Llama 4: adjacent pairs are the real and imaginary parts) is `interleaved=True`.

cos/sin are computed per forward from the positions (cheap: s x head_dim/2) rather than cached
in buffers, which keeps the module free of state that breaks on the meta device or in a
state dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def linear_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    return inv_freq / float(scaling["factor"])


def longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """LongRoPE's (Phi-3) cos/sin multiplier: `attention_factor`, else sqrt(1 + ln(factor) /
    ln(original context)) for factor = extended / original context, as transformers computes it."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling.get("factor") is None:
        raise ValueError("rope_scaling longrope: needs 'factor' (max_position_embeddings / "
                         "original_max_position_embeddings) or 'attention_factor'")
    factor = float(scaling["factor"])
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


# rope_type (HF `rope_scaling` / `rope_parameters`) -> how it changes the frequencies.
# LongRoPE is not here: its frequencies depend on the positions (see `RotaryEmbedding.cos_sin`).
INV_FREQ_SCALING = {"llama3": llama3_scaled_inv_freq, "linear": linear_scaled_inv_freq}
LONGROPE = "longrope"


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, *, base: float = 10000.0, scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim  # partial rotary (some families) rotates a prefix
        self.base = base
        self.scaling = dict(scaling) if scaling else None
        rope_type = (self.scaling or {}).get("rope_type", (self.scaling or {}).get("type", "default"))
        if rope_type not in ("default", LONGROPE, *INV_FREQ_SCALING):
            raise ValueError(f"unsupported rope scaling type '{rope_type}'")
        self.rope_type = rope_type
        self.attention_factor = 1.0  # multiplies cos and sin (LongRoPE)
        if rope_type == LONGROPE:
            self._check_longrope()
            self.attention_factor = longrope_attention_factor(self.scaling)

    def _check_longrope(self) -> None:
        scaling = self.scaling or {}
        if "original_max_position_embeddings" not in scaling:
            raise ValueError("rope_scaling longrope: missing 'original_max_position_embeddings'")
        for key in ("short_factor", "long_factor"):
            n = len(scaling.get(key) or ())
            if n != self.rotary_dim // 2:
                raise ValueError(f"rope_scaling longrope: '{key}' has {n} values, rotary_dim "
                                 f"{self.rotary_dim} needs {self.rotary_dim // 2}")

    def inv_freq(self, device: torch.device | None = None, *, long: bool = False) -> torch.Tensor:
        """[rotary_dim // 2]; `long` picks LongRoPE's long-context factors (else its short ones)."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float()
        base_pow = self.base ** (exponents / self.rotary_dim)
        if self.rope_type == LONGROPE:
            factors = (self.scaling or {})["long_factor" if long else "short_factor"]
            # 1 / (factor * base^x), in transformers' order of operations
            return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base_pow)
        inv_freq = 1.0 / base_pow
        if self.rope_type != "default":
            inv_freq = INV_FREQ_SCALING[self.rope_type](inv_freq, self.scaling or {})
        return inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [b, s, rotary_dim // 2] in `dtype` (one per frequency)."""
        if self.rope_type == LONGROPE:
            # As transformers' `dynamic_rope_update`: the long factors for every position once the
            # longest sequence in the batch (max position + 1) exceeds the original context.
            # torch.where on a 0-d tensor keeps this free of a host sync (and compilable).
            seq_len = positions.max() + 1
            original = (self.scaling or {})["original_max_position_embeddings"]
            inv_freq = torch.where(seq_len > original, self.inv_freq(positions.device, long=True),
                                   self.inv_freq(positions.device))
        else:
            inv_freq = self.inv_freq(positions.device)
        freqs = positions.float()[..., None] * inv_freq  # [b, s, d/2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's `x * cos + rotate_half(x) * sin` on the two halves, with half-size cos/sin (both
    # halves of HF's cos/sin are equal): fewer passes over x and no negated copy.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Meta's `view_as_complex(x.reshape(..., -1, 2)) * freqs_cis`, in real arithmetic.
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """x [b, n_heads, s, head_dim]; cos/sin [b, s, rotary_dim // 2]."""
    cos, sin = cos[:, None], sin[:, None]
    rotate = _rotate_pairs if interleaved else _rotate
    rot = 2 * cos.shape[-1]
    if rot == x.shape[-1]:
        return rotate(x, cos, sin)
    return torch.cat((rotate(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
