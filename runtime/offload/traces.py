"""Synthetic expert-routing traces calibrated to real Mixtral-8x7B statistics, for the
benchmark's `--routing trace` (a random-weight model routes almost uniformly, the worst case
for a cache; these traces have Mixtral's locality).

Per layer, a token's first expert repeats the previous token's with probability rho, else
it is drawn from the layer's expert popularity; the second is drawn from the popularity
without the first, the previous token's experts weighted by beta. rho and beta are solved
per layer so that P(first expert repeats) and P(the two tokens' pairs overlap) match the
published figures (interpolated between layers 0, 15 and 31).

The prefetcher's guess for a layer is the true choice with probability `guess_accuracy` per
expert (accuracy ** d for a layer d ahead), else a popularity-weighted other expert.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats.errors import ConfigError

DATA = Path(__file__).with_name("data") / "mixtral_routing.json"
_REF_LAYERS = (0, 15, 31)


@dataclass(frozen=True)
class TraceParams:
    popularity: np.ndarray  # [L, E], rows sum to 1: share of selections
    first_repeat: np.ndarray  # [L] target P(top-1 repeats)
    pair_overlap: np.ndarray  # [L] target P(consecutive pairs overlap)
    top_k: int = 2

    @property
    def layers(self) -> int:
        return self.popularity.shape[0]

    @property
    def experts(self) -> int:
        return self.popularity.shape[1]


def reference_params(layers: int, experts: int, top_k: int = 2, path: Path = DATA) -> TraceParams:
    """Mixtral's statistics mapped onto `layers` layers (layer l takes Mixtral layer
    round(l * 31 / (layers - 1))); popularity is uniform unless experts == 8."""
    if top_k != 2:
        raise ConfigError(f"trace routing is calibrated for top-2 routing, not top-{top_k}", hint="use --routing model")
    d = json.loads(Path(path).read_text())
    freq = np.asarray(d["expert_frequencies"]["layers_by_experts"], dtype=np.float64)
    src = np.rint(np.linspace(0, freq.shape[0] - 1, layers)).astype(int) if layers > 1 else np.zeros(1, int)
    if experts == freq.shape[1]:
        pop = freq[src]
    else:
        pop = np.full((layers, experts), 1.0 / experts)
    pop = pop / pop.sum(axis=1, keepdims=True)
    reuse = d["consecutive_token_reuse"]

    def curve(name: str) -> np.ndarray:
        mids = [np.mean(reuse[name][f"layer_{l}"]) / 100 for l in _REF_LAYERS]
        return np.interp(src * (31 / max(1, freq.shape[0] - 1)), _REF_LAYERS, mids)

    return TraceParams(pop, curve("first_choice"), curve("first_or_second"), top_k)


def _pair_probs(p: np.ndarray) -> dict[tuple[int, int], float]:
    """P(first=a, second=b) when a ~ p and b ~ p without a."""
    return {(a, b): p[a] * p[b] / (1 - p[a]) for a, b in itertools.permutations(range(len(p)), 2)}


def baseline_reuse(p: np.ndarray) -> tuple[float, float]:
    """(P(first repeats), P(pairs overlap)) for independent tokens with popularity p."""
    pairs = _pair_probs(p)
    first = float(np.sum(p ** 2))
    overlap = sum(pa * pb for ka, pa in pairs.items() for kb, pb in pairs.items() if set(ka) & set(kb))
    return first, float(overlap)


def _overlap(p: np.ndarray, rho: float, beta: float) -> float:
    """P(pairs overlap) of the model, the previous pair (a, b) taken from the independent
    distribution: the first repeats (rho), or is a or b itself, or the second lands on a or b."""
    E = len(p)
    a, b = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
    pab = np.where(a != b, p[a] * p[b] / np.where(a != b, 1 - p[a], 1), 0.0)  # [E, E]
    s = (p[a] + p[b])[..., None]  # [E, E, 1]
    f = np.arange(E)[None, None, :]
    outside = (f != a[..., None]) & (f != b[..., None])
    second = np.where(outside, p[f] * beta * s / ((1 - p[f]) + (beta - 1) * s), 0.0).sum(-1)  # [E, E]
    hit = rho + (1 - rho) * (s[..., 0] + second)
    return float((pab * hit).sum())


def solve_stickiness(p: np.ndarray, first_repeat: float, pair_overlap: float) -> tuple[float, float]:
    """(rho, beta): the first expert repeats the previous token's with probability rho (else it
    is drawn from p), and the second is drawn from p without the first, the previous pair's
    experts weighted by beta; solved so the model hits both targets (clipped where it cannot)."""
    b1, _ = baseline_reuse(p)
    rho = float(np.clip((first_repeat - b1) / (1 - b1), 0.0, 1.0))
    lo, hi = 0.0, 64.0  # _overlap grows with beta
    if _overlap(p, rho, lo) >= pair_overlap:
        return rho, lo
    if _overlap(p, rho, hi) <= pair_overlap:
        return rho, hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _overlap(p, rho, mid) < pair_overlap else (lo, mid)
    return rho, (lo + hi) / 2


class SyntheticRouting:
    """A RoutingOverride (runtime.offload.engine) drawing a calibrated trace token by token.

    Layer 0's route() starts a new batch of tokens; the other layers and the guesses read
    the routes drawn for that batch."""

    def __init__(self, params: TraceParams, guess_accuracy: float = 0.8, seed: int = 0):
        if not 0.0 <= guess_accuracy <= 1.0:
            raise ConfigError(f"--guess-accuracy {guess_accuracy} must be in [0, 1]")
        self.params, self.accuracy = params, guess_accuracy
        self.rng = random.Random(seed)
        # the prefetcher's guesses draw from their own generator: asking for guesses (or not, or
        # more of them) leaves the routes unchanged, so variants of one seed see the same tokens
        self.guess_rng = random.Random(f"guesses-{seed}")
        self._pop = [list(map(float, row)) for row in params.popularity]
        self._experts = list(range(params.experts))
        self.sticky = [solve_stickiness(params.popularity[l], params.first_repeat[l], params.pair_overlap[l])
                       for l in range(params.layers)]
        self._prev: list[tuple[int, int] | None] = [None] * params.layers
        self._batch: list[list[tuple[int, int]]] = []  # [T][L] pairs

    def _pick(self, weights: list[float], rng: random.Random | None = None) -> int:
        return (rng or self.rng).choices(self._experts, weights)[0]

    def _draw(self, layer: int) -> tuple[int, int]:
        p = self._pop[layer]
        rho, beta = self.sticky[layer]
        prev, rng = self._prev[layer], self.rng
        if prev is not None and rng.random() < rho:
            first = prev[0]
        else:
            first = self._pick(p)
        w = [0.0 if e == first else p[e] * (beta if prev is not None and e in prev else 1.0) for e in self._experts]
        second = self._pick(w) if sum(w) > 0 else self._pick([0.0 if e == first else 1.0 for e in self._experts])
        self._prev[layer] = (first, second)
        return first, second

    def next_tokens(self, n: int) -> list[list[tuple[int, int]]]:
        self._batch = [[self._draw(l) for l in range(self.params.layers)] for _ in range(n)]
        return self._batch

    def route(self, layer: int, n_tokens: int) -> list[list[int]]:
        if layer == 0 or len(self._batch) != n_tokens:
            self.next_tokens(n_tokens)
        return [list(tok[layer]) for tok in self._batch]

    def guess(self, layer: int, target: int, n_tokens: int, n: int) -> list[list[int]]:
        acc = self.accuracy ** (target - layer)
        return [self._guess_one(tok[target], target, n, acc) for tok in self._batch]

    def _guess_one(self, truth: tuple[int, int], target: int, n: int, acc: float) -> list[int]:
        p = self._pop[target]
        out: list[int] = []
        for e in truth[:n]:
            if self.guess_rng.random() < acc and e not in out:
                out.append(e)
            else:
                out.append(self._other(p, set(truth) | set(out)))
        while len(out) < n:
            out.append(self._other(p, set(out)))
        return out

    def _other(self, p: list[float], exclude: set[int]) -> int:
        w = [0.0 if e in exclude else p[e] for e in self._experts]
        if sum(w) <= 0:
            return next(e for e in self._experts if e not in exclude)
        return self._pick(w, self.guess_rng)


def measure_reuse(routes: list[list[tuple[int, int]]], layer: int) -> tuple[float, float]:
    """(P(first repeats), P(pairs overlap)) of consecutive tokens at `layer` of a [T][L] trace."""
    pairs = [tok[layer] for tok in routes]
    first = np.mean([a[0] == b[0] for a, b in zip(pairs, pairs[1:])])
    overlap = np.mean([bool(set(a) & set(b)) for a, b in zip(pairs, pairs[1:])])
    return float(first), float(overlap)


def trace_steps(routing: SyntheticRouting, tokens: int, prefetch: int, prefetch_layers: int = 1):
    """(layer, needed, guesses) steps for runtime.offload.schedule.simulate: decode, one token at a time."""
    L = routing.params.layers
    for _ in range(tokens):
        for layer in range(L):
            needed = routing.route(layer, 1)[0]
            targets = [t for t in range(layer + 1, layer + 1 + prefetch_layers) if t < L] if prefetch else []
            yield layer, needed, [(t, routing.guess(layer, t, 1, prefetch)[0]) for t in targets]
