"""--device and --dtype: names to torch objects, with one-line errors for what is not there."""

from __future__ import annotations

import re

import torch

from formats.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
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
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU (half-precision matmuls are slow there) and float16 on CUDA."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


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
