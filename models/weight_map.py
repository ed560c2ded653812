"""Rename parameters between Hugging Face checkpoints and our modules with name templates.

Three kinds of rule, all written as templates where `{}` stands for an index:
- renames `(hf, ours)`: one tensor each side, e.g.
  `("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q_proj.weight")`;
- fused `(hf, (ours, ...))`: one HF tensor is ours concatenated along dim 0 (Phi-3's
  `qkv_proj` = q, k, v); the split sizes come from our parameters' shapes;
- experts `(hf, ours)`: the HF template has a second `{}`, the expert; each HF tensor is one
  slice `ours[e]` of our stacked expert weight (Mixtral, Qwen3-MoE);
- stacked `(hf, (ours, ...))`: one HF tensor [E, in, sum(out)] holds all experts of our stacked
  weights [E, out, in], transposed and side by side on its last dim (Llama 4's
  `experts.gate_up_proj` = gate then up, and `experts.down_proj`, which transformers multiplies
  as `x @ w` where `nn.Linear` computes `x @ w.T`).

When our model is the text part of a larger checkpoint (multimodal Gemma-3), `aliases`
`(prefix, canonical)` read HF names starting with `prefix` as if they started with `canonical`
(saving always writes canonical names), and `skip` lists the HF name prefixes of parts we do
not model (a vision tower), which the loader leaves unread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

NamePairs = Sequence[tuple[str, str]]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _fill(template: str, *indices: str | int) -> str:
    for i in indices:
        template = template.replace("{}", str(i), 1)
    return template


@dataclass(frozen=True)
class Placement:
    """Where an HF tensor goes: whole into `ours[0]`, split over `ours` (fused), or into
    `ours[0][expert]` (experts)."""

    ours: tuple[str, ...]
    expert: int | None = None
    transposed: bool = False  # stacked: ours [E, out, in] transposed, side by side on the last dim

    @property
    def fused(self) -> bool:
        return len(self.ours) > 1


class WeightMap:
    def __init__(
        self,
        pairs: NamePairs,
        *,
        fused: Sequence[tuple[str, Sequence[str]]] = (),
        experts: NamePairs = (),
        stacked: Sequence[tuple[str, Sequence[str]]] = (),
        aliases: NamePairs = (),
        skip: Sequence[str] = (),
    ) -> None:
        self.pairs = list(pairs)
        self.fused = [(hf, tuple(ours)) for hf, ours in fused]
        self.experts = list(experts)
        self.stacked = [(hf, tuple(ours)) for hf, ours in stacked]
        self.aliases = list(aliases)
        self.skip = tuple(skip)
        self._renames = [(_compile(hf), ours) for hf, ours in self.pairs]
        self._to_hf = [(_compile(ours), hf) for hf, ours in self.pairs]
        self._fused = [(_compile(hf), ours) for hf, ours in self.fused]
        self._experts = [(_compile(hf), ours) for hf, ours in self.experts]
        self._stacked = [(_compile(hf), ours) for hf, ours in self.stacked]

    def canonical(self, hf_name: str) -> str:
        """`hf_name` with an alias prefix replaced by the name this map's rules are written in."""
        for prefix, canonical in self.aliases:
            if hf_name.startswith(prefix):
                return canonical + hf_name[len(prefix):]
        return hf_name

    def skips(self, hf_name: str) -> bool:
        """Whether `hf_name` belongs to a part of the checkpoint we do not model."""
        return hf_name.startswith(self.skip)

    def place(self, hf_name: str) -> Placement | None:
        """Where the HF tensor `hf_name` goes in our model, or None if the family has no place."""
        hf_name = self.canonical(hf_name)
        for pattern, template in self._renames:
            if m := pattern.match(hf_name):
                return Placement((_fill(template, *m.groups()),))
        for pattern, templates in self._fused:
            if m := pattern.match(hf_name):
                return Placement(tuple(_fill(t, *m.groups()) for t in templates))
        for pattern, templates in self._stacked:
            if m := pattern.match(hf_name):
                return Placement(tuple(_fill(t, *m.groups()) for t in templates), transposed=True)
        for pattern, template in self._experts:
            if m := pattern.match(hf_name):
                layer, expert = m.groups()
                return Placement((_fill(template, layer),), expert=int(expert))
        return None

    def to_hf(self, our_name: str) -> str | None:
        """The HF name of one of our parameters that is renamed one to one, else None."""
        for pattern, template in self._to_hf:
            if m := pattern.match(our_name):
                return _fill(template, *m.groups())
        return None

    def fused_group(self, our_name: str) -> tuple[str, tuple[str, ...]] | None:
        """(HF name, all our names fused into it, in HF row order) when `our_name` is one part
        of a fused HF tensor, else None."""
        for hf, ours in self.fused:
            for t in ours:
                if m := _compile(t).match(our_name):
                    return _fill(hf, *m.groups()), tuple(_fill(o, *m.groups()) for o in ours)
        return None

    def describe(self, our_name: str) -> str:
        """The HF name(s) holding `our_name`, for messages."""
        if hf := self.to_hf(our_name):
            return hf
        if group := self.fused_group(our_name):
            return group[0]
        for hf, ours in self.stacked:
            for t in ours:
                if m := _compile(t).match(our_name):
                    return _fill(hf, *m.groups())
        for hf, ours in self.experts:
            if m := _compile(ours).match(our_name):
                return _fill(hf, *m.groups(), "*")
        return our_name

    def hf_tensors(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> HF tensors (fused ones concatenated, experts unstacked)."""
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for name, tensor in state.items():
            if hf := self.to_hf(name):
                out[hf] = tensor
                used.add(name)
        joins = [(self.fused, lambda ts: torch.cat(ts)),
                 (self.stacked, lambda ts: torch.cat([t.transpose(1, 2) for t in ts], dim=-1))]
        for rules, join in joins:
            for hf, templates in rules:
                first = _compile(templates[0])
                for name in state:
                    if m := first.match(name):
                        parts = [_fill(t, *m.groups()) for t in templates]
                        out[_fill(hf, *m.groups())] = join([state[p] for p in parts])
                        used.update(parts)
        for hf, template in self.experts:
            pattern = _compile(template)
            for name, tensor in state.items():
                if m := pattern.match(name):
                    for e, t in enumerate(tensor.unbind(0)):
                        out[_fill(hf, m.group(1), e)] = t.clone()  # own storage: safetensors refuses shared
                    used.add(name)
        unmapped = [n for n in state if n not in used]
        if unmapped:
            raise ValueError(f"parameter '{unmapped[0]}' has no Hugging Face name in this family")
        return out
