"""Rename parameters between Hugging Face checkpoints and our modules with name templates.

A family lists pairs `(hf_template, our_template)` where `{}` stands for the layer index, e.g.
`("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q_proj.weight")`.
"""

from __future__ import annotations

import re
from typing import Sequence

NamePairs = Sequence[tuple[str, str]]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class WeightMap:
    def __init__(self, pairs: NamePairs) -> None:
        self.pairs = list(pairs)
        self._from_hf = [(_compile(hf), ours) for hf, ours in self.pairs]
        self._to_hf = [(_compile(ours), hf) for hf, ours in self.pairs]

    @staticmethod
    def _apply(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
        for pattern, template in table:
            m = pattern.match(name)
            if m:
                return template.replace("{}", m.group(1)) if m.groups() else template
        return None

    def to_ours(self, hf_name: str) -> str | None:
        """Our parameter name for an HF tensor name, or None if the family does not know it."""
        return self._apply(self._from_hf, hf_name)

    def to_hf(self, our_name: str) -> str | None:
        return self._apply(self._to_hf, our_name)
