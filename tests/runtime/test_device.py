"""runtime.device: --device names, the CUDA device they pick made the current one, and where
the CUDA caching allocator's memory sits (no GPU needed: the CUDA calls are faked); host
results uploaded without blocking the host (on a GPU)."""

from __future__ import annotations

import pytest
import torch

from formats.errors import ConfigError
from runtime.device import cuda_memory_breakdown, resolve_device, to_device


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


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as resolve_device can tell; the devices it makes
    current are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


@pytest.mark.parametrize("name,index", [("cuda:1", 1), ("cuda:0", 0), ("cuda", 0), ("auto", 0)])
def test_a_cuda_device_becomes_the_current_one(two_gpus, name, index):
    # Triton launches and graph captures follow the current device: cuda:1 must not run on GPU 0
    assert resolve_device(name) == torch.device("cuda", index)
    assert two_gpus == [index]


def test_the_cpu_changes_no_cuda_device(two_gpus):
    assert resolve_device("cpu") == torch.device("cpu")
    assert two_gpus == []


@pytest.mark.parametrize("name,message", [("cuda:2", "has 2 CUDA device"), ("gpu", "is not one of"), ("cuda:x", "is not one of")])
def test_devices_that_do_not_exist_are_refused(two_gpus, name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(name)
    assert two_gpus == []


def test_to_device_on_the_cpu_casts_only():
    t = torch.randn(1, 8)
    assert to_device(t, torch.device("cpu")) is t
    assert to_device(t, torch.device("cpu"), torch.float16).dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_queues_the_copy_behind_the_stream_without_waiting():
    """A CPU expert's result goes up while the GPU still works on the layer: the host must get
    control back before the stream's queued work ends (a blocking copy waits for it)."""
    import time

    device = torch.device("cuda")
    t = torch.randn(1, 4096)
    to_device(t, device, torch.float16)  # CUDA's start-up and the pinned cache's first block, outside the check
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the copy
    slept = torch.cuda.Event()
    slept.record()
    start = time.perf_counter()
    y = to_device(t, device, torch.float16)
    host_s = time.perf_counter() - start
    assert not slept.query() and host_s < 0.02, f"the host waited for the stream ({1e3 * host_s:.1f} ms)"
    assert y.device.type == "cuda" and y.dtype == torch.float16
    assert torch.equal(y.cpu(), t.to(torch.float16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_of_a_pinned_buffer_is_not_changed_by_its_next_write():
    """A caller that reuses a pinned buffer may write it as soon as to_device returns: the
    transfer must have its own copy, even while the stream is still busy."""
    device = torch.device("cuda")
    buf = torch.full((1, 4096), 1.0).pin_memory()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the copy waits behind ~0.1 s of GPU work
    y = to_device(buf, device)
    buf.fill_(2.0)
    assert torch.equal(y.cpu(), torch.full((1, 4096), 1.0))


@pytest.mark.parametrize("major,ok", [(7, False), (8, True), (9, True)])
def test_bfloat16_is_refused_on_gpus_without_it(monkeypatch, major, ok):
    """A T4 (sm_75), Colab's free GPU, has no bfloat16: one line with the fix, not a kernel
    build error; float16 and auto stay fine there."""
    from runtime.device import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda", 0)
    assert resolve_dtype("float16", cuda) == resolve_dtype("auto", cuda) == torch.float16
    if ok:
        assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    else:
        with pytest.raises(ConfigError, match="has no bfloat16") as e:
            resolve_dtype("bfloat16", cuda)
        assert "--dtype float16" in e.value.hint
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
