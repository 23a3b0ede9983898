"""When the fused Triton kernels may run, decided without importing triton eagerly: the CPU
runtime must work on machines where triton is not installed at all."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (found on the path; the import itself is deferred)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors (tests only; very slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_fused(x: torch.Tensor) -> bool:
    """Whether activations `x` should go through the fused kernels: on CUDA when triton is
    installed, or on the CPU under the Triton interpreter. Everything else uses the plain
    torch path (runtime.dequant)."""
    if not triton_available():
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting()
