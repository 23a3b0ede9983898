"""Greedy and sampled next-token choice."""

from __future__ import annotations

import math

import pytest
import torch

from formats.errors import ConfigError
from runtime.sampling import NUCLEUS_CANDIDATES, Sampler, SamplingConfig

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
    (dict(min_p=-0.1), "--min-p"), (dict(min_p=1.5), "--min-p"), (dict(min_p=math.nan), "--min-p"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"), (dict(repetition_penalty=-1.2), "--repetition-penalty"),
    (dict(repetition_penalty=math.inf), "--repetition-penalty"), (dict(repetition_penalty=math.nan), "--repetition-penalty"),
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


def test_min_p_keeps_tokens_near_the_best():
    p = torch.softmax(LOGITS, -1)
    # 0.91 of the best token's probability: e^-0.1 of token 5 passes, token 3 (e^-0.5) does not
    assert set(draws(SamplingConfig(1.0, min_p=0.9, seed=0))) == {1, 5}
    assert set(draws(SamplingConfig(1.0, min_p=1.0, seed=0), 50)) == {1}
    assert float(p[3] / p[1]) < 0.9 < float(p[5] / p[1])


def test_repetition_penalty_moves_greedy_off_a_seen_token():
    s = Sampler(SamplingConfig(0.0, repetition_penalty=1.2))
    assert s(LOGITS) == 1 and s(LOGITS, [0, 2]) == 1
    assert s(LOGITS, [1, 1, 4]) == 5  # 3.0 / 1.2 = 2.5 falls below 2.9
    # a negative logit is multiplied, so it falls further
    assert Sampler(SamplingConfig(0.0, repetition_penalty=1.2)).penalized(LOGITS, [4])[4] == pytest.approx(-1.2)


CASES = [
    dict(temperature=0.7), dict(temperature=1.3, top_k=7), dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, min_p=0.1), dict(temperature=1.1, repetition_penalty=1.3),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.15),
    dict(temperature=1.0, repetition_penalty=0.8),  # below 1 favours the context's tokens
]


# a vocabulary like Mixtral's, with peaked and with flat logits
LARGE = [(32000, 6.0, dict(temperature=0.8, top_p=0.9)), (32000, 0.5, dict(temperature=1.0, top_p=0.95)),
         (32000, 6.0, dict(temperature=0.8, top_k=40, top_p=0.5, min_p=0.02, repetition_penalty=1.3))]


@pytest.mark.parametrize("vocab, scale, kw", [(50, 3.0, c) for c in CASES] + LARGE,
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES] + ["peaked", "flat", "all"])
def test_distribution_matches_transformers_processors(vocab, scale, kw):
    """The distribution a token is drawn from equals transformers' generate() pipeline for the
    same settings: repetition penalty, then temperature, top-k, top-p and min-p."""
    gen = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    logits = torch.randn(vocab) * scale
    history = [3, 3, 17, 41, 8, 0, 17] + list(range(100, vocab, 97))
    procs = [gen.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])] if "repetition_penalty" in kw else []
    procs.append(gen.TemperatureLogitsWarper(kw["temperature"]))
    if "top_k" in kw:
        procs.append(gen.TopKLogitsWarper(kw["top_k"]))
    if "top_p" in kw:
        procs.append(gen.TopPLogitsWarper(kw["top_p"]))
    if "min_p" in kw:
        procs.append(gen.MinPLogitsWarper(kw["min_p"]))
    scores, ids = logits[None].clone(), torch.tensor([history])
    for proc in procs:
        scores = proc(ids, scores)
    expected = torch.softmax(scores[0], -1)
    got = Sampler(SamplingConfig(seed=0, **kw)).distribution(logits, history)
    assert (got > 0).tolist() == (expected > 0).tolist()
    assert torch.allclose(got, expected, atol=1e-6)
    # the cuts must bite in these cases, or the comparison proves little
    kept = int((expected > 0).sum())
    assert kept < vocab or set(kw) <= {"temperature", "repetition_penalty"}
    if vocab > 50 and "top_k" not in kw:  # the nucleus within the first candidates, and beyond them
        assert (kept < NUCLEUS_CANDIDATES) == (scale > 1), kept
    if "repetition_penalty" in kw:
        assert not torch.allclose(got, Sampler(SamplingConfig(seed=0, temperature=kw["temperature"])).distribution(logits, history))


def test_draws_follow_the_distribution():
    """The inverse-CDF draw: frequencies match the probabilities, and a token of probability 0
    (cut by top-k, here next to kept ones on both sides) never comes up."""
    s = Sampler(SamplingConfig(1.0, top_k=3, seed=0))
    counts = torch.bincount(torch.tensor([s(LOGITS) for _ in range(4000)]), minlength=6).double()
    p = s.distribution(LOGITS).double()
    assert counts[p == 0].sum() == 0
    assert torch.allclose(counts / 4000, p, atol=0.03)
