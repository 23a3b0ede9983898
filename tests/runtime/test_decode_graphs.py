"""The one-token decode path that CUDA graphs replay (runtime.decode_graphs): position in a
device tensor, attention over the whole cache with a mask. On the CPU it runs eagerly; it
must give the same tokens and logits as the ordinary path, resident and offloaded."""

from __future__ import annotations

import functools

import pytest
import torch

from runtime.experts import resident_experts
from runtime.loader import load_model

from .offload_cases import CTX, LAYERS, assert_same, greedy, offloaded
from .test_offload_helpers import tiny_file


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_file(tmp_path_factory.mktemp("decode-graphs"), LAYERS, 8)


def _model(path, graphs: bool, **kw):
    return load_model(path, "cpu", torch.float32, ctx=CTX, cuda_graphs=graphs, **kw)[0]


def test_decode_path_matches_the_ordinary_path(tiny_path):
    ref, got = _model(tiny_path, False), _model(tiny_path, True)
    assert got.use_decode_graphs and not ref.use_decode_graphs
    assert_same(greedy(ref), greedy(got))
    assert got.decode_graphs is not None and not got.decode_graphs.capturing


def test_sliding_window(tiny_path):
    """Decoding past a sliding window: the mask drops the keys the window drops."""
    ref, got = _model(tiny_path, False), _model(tiny_path, True)
    for m in (ref, got):
        for layer in m.layers:
            layer.attn.sliding_window = 5
    assert_same(greedy(ref), greedy(got))


def test_with_expert_graph_interface_and_offloading(tiny_path):
    ref = _model(tiny_path, False)
    resident = _model(tiny_path, True, expert_backend_factory=functools.partial(resident_experts, cuda_graphs=True))
    assert_same(greedy(ref), greedy(resident))
    model = offloaded(tiny_path, n_slots=3 * LAYERS, prefetch=2, cuda_graphs=True)
    model.use_decode_graphs = True
    assert_same(greedy(ref), greedy(model))


def test_new_context_drops_the_graphs(tiny_path):
    m = _model(tiny_path, True)
    greedy(m, new=2)
    assert m.decode_graphs is not None
    m.allocate_context(CTX + 8)
    assert m.decode_graphs is None
    greedy(m, new=2)
    assert m.decode_graphs.key_pos.numel() == CTX + 8


def test_position_past_the_context_is_refused(tiny_path):
    from formats.errors import ConfigError

    m = _model(tiny_path, True)
    with pytest.raises(ConfigError, match="do not fit"):
        m(torch.tensor([1]), CTX)
