"""--device and --dtype: names to torch objects, with one-line errors for what is not there."""

from __future__ import annotations

import re

import torch

from formats.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'. A CUDA device also becomes the
    current one: Triton launches, CUDA graph captures and their memory pools go to the current
    device, not their tensors', so on cuda:1 they would otherwise run on GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise ConfigError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine", hint="use --device cpu (or auto)")
    index = int(m.group(1)) if m.group(1) else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)", hint="pick an index that exists")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU (half-precision matmuls are slow there) and float16 on CUDA."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        # a T4 or older: no bfloat16 arithmetic before sm_80, and triton's kernels would not build
        raise ConfigError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic",
                          hint="use --dtype float16 (the default on CUDA)")
    return DTYPES[name]


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host tensor (a CPU expert's result, token positions) on `device`, in `dtype`,
    without blocking the host. A blocking `.to(device)` waits until everything queued on the
    stream has run, so the host could queue no more GPU work meanwhile; a copy from pinned
    memory is queued like a kernel. The cast happens on the host first: half the bytes, and no
    cast kernel. torch's pinned-memory cache keeps the copy's block until the transfer is done,
    so it may be dropped at once. A tensor that is pinned already is copied first: pin_memory()
    would return it as it is, and the caller's next write to it would race the transfer."""
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda":
        return t
    if t.is_pinned():
        t = t.clone()
    return t.pin_memory().to(device, non_blocking=True)


def peak_memory(device: torch.device) -> tuple[str, int]:
    """('gpu', torch.cuda.max_memory_allocated) on CUDA, else ('rss', peak resident set) in bytes."""
    if device.type == "cuda":
        return "gpu", int(torch.cuda.max_memory_allocated(device))
    import resource

    return "rss", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_memory_breakdown(device: torch.device) -> dict | None:
    """Where the caching allocator's memory sits on a CUDA device (None elsewhere): reserved and
    allocated bytes of the default pool and of the CUDA graphs' private pools (capture keeps a
    pool's segments for replay), and the allocator's peaks. What a memory plan that under-counts
    is missing (docs/BENCHMARKS.md section 8: ~0.95 GiB)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    pools: dict[str, dict[str, int]] = {}
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", index) != index:
            continue
        pool = "default" if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) else "graph pools"
        p = pools.setdefault(pool, {"segments": 0, "reserved": 0, "allocated": 0, "largest_segment": 0})
        p["segments"] += 1
        p["reserved"] += int(seg["total_size"])
        p["allocated"] += int(seg["allocated_size"])
        p["largest_segment"] = max(p["largest_segment"], int(seg["total_size"]))
    stats = torch.cuda.memory_stats(device)
    return {
        "pools": pools,
        "reserved_peak": int(stats.get("reserved_bytes.all.peak", 0)),
        "allocated_peak": int(stats.get("allocated_bytes.all.peak", 0)),
        "requested_peak": int(stats.get("requested_bytes.all.peak", 0)),  # before the allocator's rounding
        "inactive_split": int(stats.get("inactive_split_bytes.all.current", 0)),  # free bytes inside used segments
    }
