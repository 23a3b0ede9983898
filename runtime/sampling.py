"""Next-token choice: greedy (temperature 0) or sampling with temperature, top-k, top-p and
min-p, after an optional repetition penalty, from a seeded generator so a seed reproduces a run.

The steps and their order are transformers' (RepetitionPenaltyLogitsProcessor, then the
temperature, top-k, top-p and min-p warpers), so a user's settings mean here what they mean
in `model.generate`; tests/runtime/test_sampling.py checks the distribution against them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
            seen = torch.unique(torch.as_tensor(list(history), dtype=torch.long))
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
            sorted_logits, order = torch.sort(logits, descending=True)
            p = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop = (p.cumsum(-1) - p) >= c.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
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
        return int(torch.multinomial(self.distribution(logits, history), 1, generator=self.generator))
