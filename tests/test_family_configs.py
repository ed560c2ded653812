"""A family's `hf_config` hands out a config of its own on each call: transformers' config
classes edit nested dicts in place (rope_scaling gains keys), which must not reach the size
rows every later model of that size is built from."""

from __future__ import annotations

import copy

import pytest
import transformers

from tunewright.models.registry import all_families

ROWS = [(f, name) for f in all_families() for name, args in f.sizes.items() if args.rope_scaling]


@pytest.mark.parametrize("family, size", ROWS, ids=[f"{f.name}/{n}" for f, n in ROWS])
def test_transformers_config_from_a_size_row_leaves_the_row_as_it_was(family, size):
    args = family.sizes[size]
    before = copy.deepcopy(args.rope_scaling)
    config = family.hf_config(args)
    assert config is not family.hf_config(args)
    text = config.get("text_config", config)
    transformers.AutoConfig.for_model(**{k: v for k, v in text.items() if k != "architectures"})
    assert args.rope_scaling == before
    assert family.hf_config(args) == family.hf_config(args)  # and the config itself did not change


def test_some_rows_have_rope_scaling():
    assert len(ROWS) >= 5
