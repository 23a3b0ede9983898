"""The generation loop: prefill a prompt in one pass, then one token per step until an
end-of-sequence id, the token budget, the end of the allocated context, or the caller's
word (a stop string).

A Session remembers which tokens its KV cache holds, so a follow-up prompt that extends
the previous conversation only prefills the new tokens."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from formats.errors import ConfigError

from .device import synchronize
from .model import MixtralModel
from .sampling import Sampler


@dataclass
class GenerationStats:
    prompt_tokens: int  # tokens of the prompt (the whole conversation so far in chat mode)
    prefill_tokens: int  # of those, the ones computed (the rest were already in the KV cache)
    new_tokens: int
    prefill_s: float
    decode_s: float  # time of the steps after the first new token
    stop: str  # "eos", "max_new_tokens", "context" or "stop_string"

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"], d["decode_tok_s"] = round(self.prefill_tok_s, 3), round(self.decode_tok_s, 3)
        return d


class Session:
    def __init__(self, model: MixtralModel):
        self.model = model
        self.cached: list[int] = []  # the tokens whose keys/values sit at positions 0.. of the cache

    def generate(self, prompt: list[int], sampler: Sampler, max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                 on_token: Callable[[int], bool | None] | None = None) -> tuple[list[int], GenerationStats]:
        """Prefill `prompt`, then sample up to `max_new_tokens`. `on_token` sees each new token
        as it comes; a true return ends the generation there (a stop string was printed)."""
        ctx = self.model.max_ctx
        if not prompt:
            raise ConfigError("the prompt is empty", hint="give at least one token")
        if len(prompt) > ctx:
            raise ConfigError(
                f"the prompt has {len(prompt)} tokens but the context holds {ctx}",
                hint="shorten the prompt or allocate a longer context with --ctx",
            )
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
        # reuse the cached prefix; at least one token must be computed to get logits
        reuse = 0
        for a, b in zip(self.cached, prompt[:-1]):
            if a != b:
                break
            reuse += 1
        device = self.model.device
        t0 = time.perf_counter()
        logits = self.model(torch.tensor(prompt[reuse:], dtype=torch.long, device=device), reuse, last_only=True)
        token = sampler(logits[-1], prompt)  # syncs the device
        t1 = time.perf_counter()
        self.cached = list(prompt)
        new, stop = [token], "max_new_tokens"
        halt = bool(on_token and on_token(token))
        while True:
            if halt:
                stop = "stop_string"
                break
            if token in eos_ids:
                stop = "eos"
                break
            if len(new) >= max_new_tokens:
                break
            pos = len(self.cached)
            if pos >= ctx:
                stop = "context"
                break
            logits = self.model(torch.tensor([token], dtype=torch.long, device=device), pos, last_only=True)
            self.cached.append(token)
            token = sampler(logits[-1], self.cached)
            new.append(token)
            halt = bool(on_token and on_token(token))
        synchronize(device)
        t2 = time.perf_counter()
        stats = GenerationStats(len(prompt), len(prompt) - reuse, len(new), t1 - t0, t2 - t1, stop)
        return new, stats
