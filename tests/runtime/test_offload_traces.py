"""Synthetic routing traces reproduce the Mixtral statistics they are calibrated to."""

from __future__ import annotations

import numpy as np
import pytest

from formats.errors import ConfigError
from runtime.offload.cache import ExpertCache
from runtime.offload.schedule import Planner, simulate
from runtime.offload.traces import SyntheticRouting, measure_reuse, reference_params, trace_steps


@pytest.fixture(scope="module")
def mixtral():
    params = reference_params(32, 8)
    routing = SyntheticRouting(params, guess_accuracy=0.8, seed=7)
    return params, routing, routing.next_tokens(3000)


def test_reference_data_is_mixtral(mixtral):
    params, _, _ = mixtral
    assert params.popularity.shape == (32, 8)
    np.testing.assert_allclose(params.popularity.sum(axis=1), 1.0)
    assert 0.01 < params.popularity.min() < 0.02 and 0.24 < params.popularity.max() < 0.25  # FACTS.md section 5
    assert params.first_repeat[15] == pytest.approx((23.6 + 28.4) / 200)
    assert params.pair_overlap[0] == pytest.approx((44.9 + 49.9) / 200)


@pytest.mark.parametrize("layer", [0, 15, 31])
def test_consecutive_token_reuse_matches_targets(mixtral, layer):
    params, _, tokens = mixtral
    first, overlap = measure_reuse(tokens, layer)
    assert first == pytest.approx(params.first_repeat[layer], abs=0.03)
    assert overlap == pytest.approx(params.pair_overlap[layer], abs=0.03)


def test_expert_popularity_matches(mixtral):
    params, _, tokens = mixtral
    for layer in (3, 20):
        counts = np.bincount([e for tok in tokens for e in tok[layer]], minlength=8) / (2 * len(tokens))
        np.testing.assert_allclose(counts, params.popularity[layer], atol=0.03)


def test_routes_are_distinct_pairs_and_guesses_have_the_stated_accuracy(mixtral):
    params, routing, _ = mixtral
    right = total = 0
    for _ in range(1500):
        routes = routing.route(0, 1)
        assert len(set(routes[0])) == 2
        guess = routing.guess(0, 1, 1, 2)[0]
        truth = routing.route(1, 1)[0]
        assert len(set(guess)) == 2
        right += sum(g == t for g, t in zip(guess, truth))
        total += 2
    assert right / total == pytest.approx(0.8, abs=0.03)


def test_lru_hit_rates_match_published_figures():
    """Third-party figures for real Mixtral (FACTS.md section 5): LRU with 2 of 8 experts
    cached per layer hits ~30%, with 6 of 8 ~81%."""
    params = reference_params(32, 8)
    rates = {}
    for per_layer in (2, 6):
        planner = Planner(ExpertCache.per_layer([per_layer] * 32), 0)
        rates[per_layer] = simulate(planner, trace_steps(SyntheticRouting(params, seed=1), 300, 0)).hit_rate
    assert rates[2] == pytest.approx(0.30, abs=0.04)
    assert rates[6] == pytest.approx(0.81, abs=0.05)


def test_other_shapes():
    p = reference_params(4, 8)
    assert p.popularity.shape == (4, 8)
    u = reference_params(2, 4)
    np.testing.assert_allclose(u.popularity, 0.25)
    with pytest.raises(ConfigError, match="top-2"):
        reference_params(4, 8, top_k=1)
    with pytest.raises(ConfigError, match="--guess-accuracy"):
        SyntheticRouting(p, guess_accuracy=1.5)


def test_guesses_leave_the_routes_unchanged():
    """The prefetcher's guesses draw from their own generator: a run that asks for them sees
    the same tokens as one that does not, so bench variants of one seed compare like for like."""
    params = reference_params(4, 8)
    plain, guessing = SyntheticRouting(params, seed=5), SyntheticRouting(params, seed=5)
    for _ in range(50):
        for layer in range(4):
            assert plain.route(layer, 1) == guessing.route(layer, 1)
            if layer + 1 < 4:
                guessing.guess(layer, layer + 1, 1, 2)
