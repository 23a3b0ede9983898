"""Next-token choice: greedy (temperature 0) or sampling with temperature, top-k and top-p,
from a seeded generator so a seed reproduces a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from formats.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError(f"--temperature {self.temperature} must be >= 0", hint="0 means greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} must be >= 0", hint="0 disables the top-k cut")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1]", hint="1 disables nucleus sampling")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed {self.seed} must be in [0, 2**63)")

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

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] (any device/dtype) -> the next token id."""
        c = self.config
        logits = logits.detach().float().cpu()
        if c.greedy:
            return int(torch.argmax(logits))
        logits = logits / c.temperature
        if 0 < c.top_k < logits.numel():
            kth = torch.topk(logits, c.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= c.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
