"""QuantRecipe: CLI options -> formats.Recipe, with errors that name the option."""

from __future__ import annotations

import pytest

from formats.errors import ConfigError
from formats.header import ModelConfig
from formats.qtensor import QuantSpec
from quantize.recipe import QuantRecipe
from tests.quantize.helpers import MIXTRAL



def test_defaults_are_the_reference_recipe_with_4bit_expert_meta():
    r = QuantRecipe().build(MIXTRAL)
    assert r["attention"] == QuantSpec(4, 64, 8, 256)
    assert r["experts"] == QuantSpec(2, 16, 4, 128)
    assert QuantRecipe(expert_meta_bits=8).build(MIXTRAL)["experts"] == QuantSpec(2, 16, 8, 128)  # the paper's
    assert r["lm_head"] == QuantSpec(16)
    for role in ("embeddings", "norms", "router"):
        assert r[role] == QuantSpec(16)


@pytest.mark.parametrize("bits, group, meta, meta_group", [(2, 16, 4, 128), (3, 64, 4, 128), (4, 64, 8, 256), (8, 64, 8, 256)])
def test_default_group_sizes_per_bits(bits, group, meta, meta_group):
    assert QuantRecipe(expert_bits=bits).build(MIXTRAL)["experts"] == QuantSpec(bits, group, meta, meta_group)


def test_overrides_and_fp16_meta():
    r = QuantRecipe(expert_bits=3, expert_group_size=128, meta_group_size=64, lm_head_bits=4).build(MIXTRAL)
    assert r["experts"] == QuantSpec(3, 128, 4, 64)
    assert r["lm_head"] == QuantSpec(4, 64, 8, 64)
    r = QuantRecipe(meta_bits=16).build(MIXTRAL)
    assert r["experts"] == QuantSpec(2, 16, 16, 0) and r["attention"] == QuantSpec(4, 64, 16, 0)
    assert QuantRecipe(attn_bits=16, expert_bits=16).build(MIXTRAL)["experts"] == QuantSpec(16)


def test_expert_meta_bits_key_the_experts_alone():
    r = QuantRecipe(expert_meta_bits=4).build(MIXTRAL)
    assert r["experts"] == QuantSpec(2, 16, 4, 128) and r["attention"] == QuantSpec(4, 64, 8, 256)
    r = QuantRecipe(meta_bits=16, expert_meta_bits=4, meta_group_size=64).build(MIXTRAL)
    assert r["experts"] == QuantSpec(2, 16, 4, 64) and r["attention"] == QuantSpec(4, 64, 16, 0)
    assert QuantRecipe(meta_bits=4).build(MIXTRAL)["lm_head"] == QuantSpec(16)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(expert_bits=5), "--expert-bits 5"),
    (dict(attn_bits=0), "--attn-bits 0"),
    (dict(lm_head_bits=1), "--lm-head-bits 1"),
    (dict(meta_bits=5), "--meta-bits 5"),
    (dict(expert_meta_bits=2), "--expert-meta-bits 2"),
    (dict(expert_group_size=20), "--expert-group-size 20"),
    (dict(attn_group_size=0), "--attn-group-size 0"),
    (dict(attn_bits=16, attn_group_size=64), "--attn-group-size 64 has no effect"),
    (dict(meta_bits=16, meta_group_size=128), "--meta-group-size 128 has no effect"),
    (dict(meta_group_size=0), "--meta-group-size 0"),
])
def test_option_errors_name_the_option(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        QuantRecipe(**kwargs)
    assert needle in e.value.message and e.value.hint


def test_group_size_must_divide_the_model_dimensions():
    with pytest.raises(ConfigError) as e:
        QuantRecipe(expert_group_size=96).build(MIXTRAL)  # 4096 % 96 != 0
    assert "--expert-group-size 96" in e.value.message and "hidden size (4096)" in e.value.message
    assert "e.g. 256" in e.value.hint
    odd = ModelConfig(**{**MIXTRAL.__dict__, "intermediate_size": 14336 + 8})
    with pytest.raises(ConfigError, match="intermediate size"):
        QuantRecipe(expert_bits=3).build(odd)  # g64 divides 4096 but not 14344
    QuantRecipe(expert_bits=3, expert_group_size=8).build(odd)  # 8 divides both


def test_attention_group_must_divide_heads_times_head_dim():
    cfg = ModelConfig(**{**MIXTRAL.__dict__, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 40})
    with pytest.raises(ConfigError, match=r"attention width \(heads x head_dim\) \(160\)"):
        QuantRecipe().build(cfg)
    assert QuantRecipe(attn_group_size=32).build(cfg)["attention"].group_size == 32
