"""The generation loop: stop conditions and KV-prefix reuse across turns."""

from __future__ import annotations

import pytest
import torch

from formats.errors import ConfigError
from runtime.generation import Session
from runtime.loader import load_model
from runtime.sampling import Sampler, SamplingConfig

PROMPT = [1, 40, 41, 7, 99, 310, 12]


@pytest.fixture(scope="module")
def model(file42):
    return load_model(file42, torch.device("cpu"), torch.float32, ctx=24)[0]


def greedy() -> Sampler:
    return Sampler(SamplingConfig(0.0))


def manual_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor(ids), 0)[-1].argmax()))
    return ids[len(prompt):]


def test_generate_matches_a_manual_greedy_loop(model):
    seen = []
    new, stats = Session(model).generate(PROMPT, greedy(), 6, on_token=seen.append)
    assert new == seen == manual_greedy(model, PROMPT, 6)
    assert (stats.prompt_tokens, stats.prefill_tokens, stats.new_tokens, stats.stop) == (7, 7, 6, "max_new_tokens")
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.decode_tok_s > 0
    assert set(stats.to_json()) >= {"prompt_tokens", "new_tokens", "prefill_tok_s", "decode_tok_s", "stop"}


def test_stops_at_eos(model):
    expected = manual_greedy(model, PROMPT, 6)
    eos = expected[2]
    new, stats = Session(model).generate(PROMPT, greedy(), 6, eos_ids=(eos,))
    assert new == expected[: expected.index(eos) + 1] and stats.stop == "eos"


def test_stops_when_the_caller_says_so(model):
    expected = manual_greedy(model, PROMPT, 6)
    seen = []
    new, stats = Session(model).generate(PROMPT, greedy(), 6, on_token=lambda t: seen.append(t) or len(seen) == 3)
    assert new == seen == expected[:3] and stats.stop == "stop_string"
    new, stats = Session(model).generate(PROMPT, greedy(), 6, on_token=lambda t: True)
    assert new == expected[:1] and stats.stop == "stop_string"


def test_stops_at_the_end_of_the_context(model):
    new, stats = Session(model).generate(PROMPT, greedy(), 100)
    assert stats.stop == "context"
    assert len(PROMPT) + len(new) == model.max_ctx + 1  # the last token is sampled, never fed back


def test_the_sampler_sees_the_whole_context(model):
    """The repetition penalty needs every token in the context: the prompt, then each new one."""
    class Recording(Sampler):
        def __call__(self, logits, history=()):
            calls.append(list(history))
            return super().__call__(logits, history)

    calls = []
    new, _ = Session(model).generate(PROMPT, Recording(SamplingConfig(0.0, repetition_penalty=1.5)), 5)
    assert calls == [PROMPT + new[:i] for i in range(5)]
    ids = list(PROMPT)  # the penalty is applied at each step to the context's logits
    for _ in range(5):
        ids.append(Sampler(SamplingConfig(0.0, repetition_penalty=1.5))(model(torch.tensor(ids), 0)[-1], ids))
    assert new == ids[len(PROMPT):]


def test_follow_up_reuses_the_cached_prefix(model):
    s = Session(model)
    first, _ = s.generate(PROMPT, greedy(), 3)
    follow = PROMPT + first + [5, 6]
    new, stats = s.generate(follow, greedy(), 4)
    assert stats.prefill_tokens == len(follow) - (len(PROMPT) + len(first) - 1)
    assert new == manual_greedy(model, follow, 4)
    # a prompt that diverges early recomputes from the divergence
    other = PROMPT[:2] + [3, 3, 3]
    new, stats = s.generate(other, greedy(), 2)
    assert stats.prefill_tokens == 3 and new == manual_greedy(model, other, 2)


def test_prompt_errors(model):
    with pytest.raises(ConfigError, match="25 tokens but the context holds 24"):
        Session(model).generate([1] * 25, greedy(), 2)
    with pytest.raises(ConfigError, match="empty"):
        Session(model).generate([], greedy(), 2)
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        Session(model).generate(PROMPT, greedy(), 0)
