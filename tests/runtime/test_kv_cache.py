"""Incremental decoding through the KV cache equals one full forward of the sequence."""

from __future__ import annotations

import pytest
import torch

from formats.errors import ConfigError
from runtime.attention import attention_mask
from runtime.loader import load_model
from tests.runtime.packing_helpers import CPU_KERNEL_TOL

SEQ = [1, 40, 41, 7, 99, 310, 12, 5, 260, 18, 77, 3]


@pytest.fixture(scope="module")
def model(file42):
    return load_model(file42, torch.device("cpu"), torch.float32, ctx=16)[0]


def test_step_by_step_equals_full_forward(model):
    full = model(torch.tensor(SEQ), 0)  # [T, V]
    steps = torch.cat([model(torch.tensor([t]), i) for i, t in enumerate(SEQ)])
    torch.testing.assert_close(steps, full, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)


def test_chunked_prefill_equals_full_forward(model):
    full = model(torch.tensor(SEQ), 0)
    first = model(torch.tensor(SEQ[:5]), 0)
    rest = model(torch.tensor(SEQ[5:]), 5)
    torch.testing.assert_close(torch.cat([first, rest]), full, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)


def test_later_positions_overwrite_the_cache(model):
    """Re-running from position 3 with other tokens must forget the old tokens 3..."""
    model(torch.tensor(SEQ), 0)
    other = [2, 2, 2]
    model(torch.tensor(SEQ[:3]), 0)
    a = model(torch.tensor(other), 3)
    b = model(torch.tensor(SEQ[:3] + other), 0)[3:]
    torch.testing.assert_close(a, b, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)


def test_positions_past_the_context_are_refused(model):
    with pytest.raises(ConfigError, match="allocated context of 16"):
        model(torch.tensor([1] * 17), 0)
    with pytest.raises(ConfigError, match="allocated context"):
        model(torch.tensor([1]), 16)
    model(torch.tensor([1]), 15)  # the last position is fine


def test_reallocating_the_context(file42):
    m = load_model(file42, torch.device("cpu"), torch.float32, ctx=4)[0]
    assert m.cache.layers[0].shape == (2, m.config.num_key_value_heads, 4, m.config.head_dim)
    m.allocate_context(32)
    assert m.max_ctx == 32
    m(torch.tensor(SEQ + SEQ), 0)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        m.allocate_context(m.config.max_position_embeddings + 1)


def test_attention_mask():
    assert attention_mask(1, 7, None, torch.device("cpu")) is None
    m = attention_mask(3, 2, None, torch.device("cpu"))
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    w = attention_mask(1, 4, 2, torch.device("cpu"))  # position 4 sees 3 and 4 only
    assert w.tolist() == [[False, False, False, True, True]]
