"""Greedy and sampled next-token choice."""

from __future__ import annotations

import math

import pytest
import torch

from formats.errors import ConfigError
from runtime.sampling import Sampler, SamplingConfig

LOGITS = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.9])


def draws(cfg: SamplingConfig, n: int = 400) -> list[int]:
    s = Sampler(cfg)
    return [s(LOGITS) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingConfig(0.0), 20)) == {1}


def test_seed_reproduces_and_varies():
    a = draws(SamplingConfig(1.0, seed=7), 50)
    assert a == draws(SamplingConfig(1.0, seed=7), 50)
    assert a != draws(SamplingConfig(1.0, seed=8), 50)
    assert len(set(a)) > 2


def test_top_k_keeps_the_k_best():
    assert set(draws(SamplingConfig(5.0, top_k=3, seed=0))) == {1, 3, 5}
    assert set(draws(SamplingConfig(5.0, top_k=1, seed=0), 50)) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.softmax(LOGITS, -1).sort(descending=True).values
    # just above the best token's mass: the best two must stay, nothing else
    top_p = float(p[0]) + 1e-3
    assert set(draws(SamplingConfig(1.0, top_p=top_p, seed=0))) == {1, 5}
    assert set(draws(SamplingConfig(1.0, top_p=float(p[0]) * 0.5, seed=0), 50)) == {1}


def test_temperature_sharpens():
    cold = draws(SamplingConfig(0.2, seed=1))
    hot = draws(SamplingConfig(3.0, seed=1))
    assert cold.count(1) > hot.count(1)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "--temperature"), (dict(temperature=math.nan), "--temperature"),
    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"), (dict(top_k=-1), "--top-k"), (dict(seed=-3), "--seed"),
])
def test_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kw)


def test_unseeded_sampler_leaves_torch_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Sampler(SamplingConfig(1.0))(LOGITS)
    assert torch.equal(torch.rand(3), expected)
