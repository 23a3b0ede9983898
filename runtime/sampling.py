"""Next-token choice: greedy (temperature 0) or sampling with temperature, top-k, top-p and
min-p, after an optional repetition penalty, from a seeded generator so a seed reproduces a run.

The steps and their order are transformers' (RepetitionPenaltyLogitsProcessor, then the
temperature, top-k, top-p and min-p warpers), so a user's settings mean here what they mean
in `model.generate`; tests/runtime/test_sampling.py checks the distribution against them."""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from formats.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0  # drop tokens below min_p times the best token's probability; 0: off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context; 1: off

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError(f"--temperature {self.temperature} must be >= 0", hint="0 means greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} must be >= 0", hint="0 disables the top-k cut")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1]", hint="1 disables nucleus sampling")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed {self.seed} must be in [0, 2**63)")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"--min-p {self.min_p} must be in [0, 1]", hint="0 disables the min-p cut; 0.05 is common")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(f"--repetition-penalty {self.repetition_penalty} must be a positive number",
                              hint="1 disables it; 1.1 to 1.3 discourage repeats")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        # sampling runs on the CPU: the logits row is small, and a CPU generator gives the
        # same tokens for the same seed whatever the compute device
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()  # a fresh random seed for this generator only, not torch's global one

    def penalized(self, logits: torch.Tensor, history: Sequence[int] = ()) -> torch.Tensor:
        """logits: [V] -> float32 [V] on the CPU, with the repetition penalty on every token
        id of `history` (the prompt and the tokens generated so far): a positive logit is
        divided by it, a negative one multiplied, each token once however often it occurs."""
        logits = logits.detach().float().cpu()
        penalty = self.config.repetition_penalty
        if penalty != 1 and len(history):
            # array.array: a list of ints into a tensor ~7x faster than torch.as_tensor (0.09 against
            # 0.62 ms for 4096 tokens); repeated ids all write the same value
            seen = torch.frombuffer(array.array("q", history), dtype=torch.int64)
            score = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(score < 0, score * penalty, score / penalty)
        return logits

    def distribution(self, logits: torch.Tensor, history: Sequence[int] = ()) -> torch.Tensor:
        """The probabilities [V] a sampled token is drawn from (temperature > 0)."""
        c = self.config
        logits = self.penalized(logits, history) / c.temperature
        if 0 < c.top_k < logits.numel():
            kth = torch.topk(logits, c.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1:
            logits = _nucleus(logits, c.top_p)
        probs = torch.softmax(logits, dim=-1)
        if c.min_p > 0:
            # the best token always passes: its probability is the maximum
            probs = probs.masked_fill(probs < c.min_p * probs.max(), 0)
            probs = probs / probs.sum()
        return probs

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits: [V] (any device/dtype) -> the next token id. `history`: the token ids in
        the context so far, for the repetition penalty."""
        if self.config.greedy:
            return int(torch.argmax(self.penalized(logits, history)))
        # inverse CDF: one uniform draw and a binary search, where torch.multinomial took 0.8 ms
        # for 32000 tokens on 2 cores. right=True: the first token whose cumulative mass exceeds
        # u, never one of probability 0
        cum = self.distribution(logits, history).double().cumsum(0)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64) * float(cum[-1])
        return min(int(torch.searchsorted(cum, u, right=True)), cum.numel() - 1)


NUCLEUS_CANDIDATES = 256  # the best tokens looked at first for top-p (an LLM's nucleus is usually smaller)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [V] with every token outside the top-p nucleus at -inf: the fewest best tokens
    whose probabilities reach top_p (a token is dropped when the ones before it already do; the
    first always stays). Only the cut's probability is needed, not the order. torch.sort took
    2.5 ms for 32000 values on 2 cores; the best 256 by topk take 0.1 ms and usually hold the
    nucleus, and where they do not, numpy sorts the values alone in 0.2 ms. Tokens tied with the
    last one kept stay too (a sort would keep an arbitrary part of them)."""
    probs = torch.softmax(logits, dim=-1)
    p = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.numel())).values.numpy()  # descending
    if p.sum() < top_p:
        p = np.sort(probs.numpy())[::-1]
    n = int(np.count_nonzero(np.cumsum(p) - p < top_p))  # mass before each token: nondecreasing
    return logits.masked_fill(probs < float(p[n - 1]), float("-inf"))
