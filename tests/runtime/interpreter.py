"""The Triton kernels under the interpreter, for test modules that run them on the CPU.

@triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when triton and the
kernel modules are imported, and triton reads it again while launching. `interpreted_kernels`
sets it for the import (reloading modules imported earlier without it), and the module's
`interpreter` fixture sets it for each test of that module only, so the rest of the session
(other test modules whose runtime paths consult runtime.kernels.use_fused) keeps the plain
CPU path. With CUDA the kernels are compiled and nothing changes.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()


def interpreted_kernels():
    """(triton_gemv, triton_dequant, triton_gemm, triton_decode), interpreted when there is
    no CUDA; skips without triton."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        from triton.runtime.interpreter import InterpretedFunction

        from runtime.kernels import triton_decode, triton_dequant, triton_gemm, triton_gemv

        mods = [triton_gemv, triton_dequant, triton_gemm, triton_decode]
        if not CUDA and not all(isinstance(m, InterpretedFunction) for m in (
                triton_gemv.qgemv_kernel, triton_dequant.dequant_kernel, triton_gemm.qgemm_kernel,
                triton_decode.norm_kernel)):
            # imported earlier without the interpreter; triton_gemv first: the others import
            # its helpers, and must see the interpreted ones
            mods = [importlib.reload(m) for m in mods]
        return tuple(mods)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def use_interpreter(monkeypatch) -> None:
    """For the current test: kernels on CPU tensors run interpreted."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
