"""runtime.device: where the CUDA caching allocator's memory sits (no GPU needed: the
allocator's snapshot is faked)."""

from __future__ import annotations

import torch

from runtime.device import cuda_memory_breakdown


def test_memory_breakdown_splits_default_and_graph_pools(monkeypatch):
    snapshot = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 20 << 20, "allocated_size": 18 << 20},
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 2 << 20, "allocated_size": 1 << 20},
        {"device": 0, "segment_pool_id": (1, 3), "total_size": 2 << 20, "allocated_size": 512},  # a graph's pool
        {"device": 1, "segment_pool_id": (0, 0), "total_size": 1 << 30, "allocated_size": 0},  # another GPU
    ]
    stats = {"reserved_bytes.all.peak": 30 << 20, "allocated_bytes.all.peak": 25 << 20,
             "requested_bytes.all.peak": 24 << 20, "inactive_split_bytes.all.current": 1 << 20}
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    got = cuda_memory_breakdown(torch.device("cuda", 0))
    assert got["pools"] == {
        "default": {"segments": 2, "reserved": 22 << 20, "allocated": 19 << 20, "largest_segment": 20 << 20},
        "graph pools": {"segments": 1, "reserved": 2 << 20, "allocated": 512, "largest_segment": 2 << 20},
    }
    assert (got["reserved_peak"], got["allocated_peak"], got["requested_peak"], got["inactive_split"]) == (
        30 << 20, 25 << 20, 24 << 20, 1 << 20)


def test_memory_breakdown_is_none_off_cuda():
    assert cuda_memory_breakdown(torch.device("cpu")) is None
