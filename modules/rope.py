"""Rotary position embeddings in the Hugging Face layout ("rotate_half": the two halves of each
head are the real and imaginary parts), so HF q/k weights load with no permutation.

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


# rope_type (HF `rope_scaling` / `rope_parameters`) -> how it changes the frequencies.
INV_FREQ_SCALING = {"llama3": llama3_scaled_inv_freq, "linear": linear_scaled_inv_freq}


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
        if rope_type not in ("default", *INV_FREQ_SCALING):
            raise ValueError(f"unsupported rope scaling type '{rope_type}'")
        self.rope_type = rope_type

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.base ** (exponents / self.rotary_dim))
        if self.rope_type != "default":
            inv_freq = INV_FREQ_SCALING[self.rope_type](inv_freq, self.scaling or {})
        return inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [b, s, rotary_dim // 2] in `dtype` (one per frequency)."""
        freqs = positions.float()[..., None] * self.inv_freq(positions.device)  # [b, s, d/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's `x * cos + rotate_half(x) * sin` on the two halves, with half-size cos/sin (both
    # halves of HF's cos/sin are equal): fewer passes over x and no negated copy.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, n_heads, s, head_dim]; cos/sin [b, s, rotary_dim // 2]."""
    cos, sin = cos[:, None], sin[:, None]
    rot = 2 * cos.shape[-1]
    if rot == x.shape[-1]:
        return _rotate(x, cos, sin)
    return torch.cat((_rotate(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
