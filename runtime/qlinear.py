"""Linear layers over weights read from a .moepack file: dense, or packed and computed on the
fly (fused Triton kernels on the GPU; for a few tokens on the CPU, runtime.cpu_expert's
kernels; else dequantize, then matmul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formats.qtensor import QuantSpec, matrix_layout

from . import cpu_expert  # its _native looked up at each call: tests switch kernels
from .cpu_expert import packed_matvec
from .dequant import component_tensors, dequantize, row_prefix_ok
from .experts import CPU_KERNEL_MAX_TOKENS, NATIVE_MAX_TOKENS
from .kernels import interpreting, qmatmul, use_fused


class DenseLinear(nn.Module):
    """y = x @ W.T with W [out, in] held dense in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the CPU kernels take it: [T, K] float32, contiguous (no copy when it is)."""
    xs = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if xs.dtype != torch.float32 or not xs.is_contiguous() or xs.requires_grad:
        xs = xs.detach().to(torch.float32).contiguous()
    return xs


def _from_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A CPU kernel's [T, N] float32 result in x's leading shape and dtype."""
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class QuantLinear(nn.Module):
    """y = x @ W.T with W kept packed on the device (its record's bytes) and dequantized in
    every forward: memory stays at the packed size at the cost of a dequantize per call."""

    def __init__(self, raw: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype):
        super().__init__()
        self.shape, self.spec, self.dtype = tuple(shape), spec, dtype
        self.register_buffer("raw", raw, persistent=False)  # uint8 [nbytes]
        self.comps = component_tensors(raw, self.shape, spec)

    def weight(self, transient: bool = False) -> torch.Tensor:
        """The dense weight [out, in]; transient: on the CPU, a view of the thread's scratch
        buffer for a caller that multiplies and drops it (cpu_expert.dequantize_packed)."""
        if self.raw.is_cpu:  # the compiled kernel's dequantize where it applies (the same bits)
            return cpu_expert.dequantize_packed(self.raw, self.shape, self.spec, 0, self.dtype, transient=transient)
        return dequantize(self.comps, self.shape, self.spec, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the CPU test first, with cheap tests: a small model's decode makes ~120 of these calls
        # per token, and each torch call costs microseconds of host time
        if x.is_cpu and self.raw.is_cpu and not interpreting():
            y = self._cpu_kernel(x)
            return y if y is not None else F.linear(x, self.weight(transient=True))
        if use_fused(x):  # CUDA, or the CPU under the Triton interpreter
            return qmatmul(x.to(self.dtype), self.comps, self.shape, self.spec)
        return F.linear(x, self.weight())

    def _cpu_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T by runtime.cpu_expert's kernels on the packed bytes (decode, and prompts of up
        to NATIVE_MAX_TOKENS tokens where the compiled kernel takes the layout; numba up to
        CPU_KERNEL_MAX_TOKENS), or None: more tokens amortise one dequantize, and tiny or odd
        layouts may have no kernel."""
        tokens = x.numel() // x.shape[-1]
        if tokens > NATIVE_MAX_TOKENS or not self.spec.quantized:
            return None
        if tokens > CPU_KERNEL_MAX_TOKENS and cpu_expert.native_matrix(self.raw, self.shape, self.spec) is None:
            return None  # numba re-decodes every weight per token
        y = packed_matvec(self.raw, self.shape, self.spec, 0, _as_rows(x))  # straight on the raw bytes
        return None if y is None else _from_rows(y, x)

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.spec.describe()}"


def input_format(linear: nn.Module, x: torch.Tensor):
    """The GEMV input format (kernels.qgemv.XFormat) linear's fused GEMV converts x [T, K]
    into before it runs, or None (none, or no fused GEMV for this call): a producer that
    writes it saves that launch (forward_partials' `prepared`)."""
    from .kernels.qgemv import PREFILL_THRESHOLD, gemv_supported, launch_plan, x_format

    if not (isinstance(linear, QuantLinear) and x.dim() == 2 and x.shape[0] <= PREFILL_THRESHOLD and use_fused(x)
            and linear.spec.quantized and gemv_supported(linear.shape, linear.spec)):
        return None
    return x_format(launch_plan(x, linear.shape, linear.spec, False))


def forward_partials(linear: nn.Module, x: torch.Tensor, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x) for x [T, K], except that a fused split-K GEMV returns its float32 partials
    [P, T, N] unsummed: the decode step's fused kernels (kernels.decode_ops) sum them as
    they read them, which saves the sum's and the cast's launches. prepared: x already in
    input_format(linear, x)."""
    if isinstance(linear, QuantLinear) and x.dim() == 2 and use_fused(x):
        return qmatmul(x.to(linear.dtype), linear.comps, linear.shape, linear.spec, keep_partials=True,
                       prepared=prepared)
    return linear(x)


class HalfLinear(nn.Module):
    """y = x @ W.T on the CPU with W [out, in] kept in the file's fp16: for a few tokens the
    compiled kernel widens it in registers (float32 arithmetic, so the float32 matmul's result
    up to summation order) from half the bytes of a float32 copy; more tokens widen it per call.
    Mixtral's fp16 lm_head is 262 MB instead of 524 MB read per token."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight16", weight.contiguous(), persistent=False)  # [out, in] float16
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = cpu_expert._native() if x.is_cpu and x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_TOKENS else None
        if native is None:
            return F.linear(x, self.weight16.to(x.dtype))
        return _from_rows(native.gemv_f16(self.weight16, _as_rows(x), torch.get_num_threads()), x)

    def extra_repr(self) -> str:
        return f"{list(self.weight16.shape)}, float16 kept"


# Widened (float32) bytes above which a CPU fp16 matrix stays fp16 (HalfLinear). One row at a
# time, the C GEMV over half the bytes wins from ~8 MB up (dev-cpu, 2 threads, 2026-11-23:
# [2048, 1024] 0.14 vs 0.24 ms, [4096, 1024] 0.24 vs 0.98, SmolLM2's [49152, 576] lm_head
# 3.2 vs 10.2); at 16 rows the two tie at 16 MB and dense wins below. Decode and the prompt's
# last row (generate's lm_head) are one row.
HALF_CPU_LIMIT = 16 << 20


def make_linear(raw: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype,
                dequantize_at_load: bool) -> nn.Module:
    """raw: the tensor's record bytes (uint8, on the compute device)."""
    if spec.quantized and not dequantize_at_load:
        return QuantLinear(raw, shape, spec, dtype)
    comps = component_tensors(raw, shape, spec)
    if (not spec.quantized and raw.device.type == "cpu" and dtype == torch.float32
            and shape[0] * shape[1] * 4 > HALF_CPU_LIMIT and comps["weight"].dtype == torch.float16
            and cpu_expert._native() is not None):
        return HalfLinear(comps["weight"], dtype)
    return DenseLinear(cpu_expert.dequantize_packed(raw, shape, spec, 0, dtype))  # on the CPU: the compiled kernel's


def rows_concatenable(shapes: list[tuple[int, ...]], spec: QuantSpec) -> bool:
    """Whether matrices of `shapes` (same columns), all in `spec`, stack along their rows into
    one matrix of that spec by concatenating each component: every component is row-major
    (bit planes [rows, bytes], scales and zeros in row-major group order), so it does unless
    4/8-bit meta groups straddle two matrices (a matrix's group count not a multiple of the
    meta group size) or a 4-bit meta byte would (an odd group count)."""
    if len(shapes) < 2 or any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
        return False
    return all(row_prefix_ok(s[0], s[1], spec) for s in shapes)


def concat_rows(linears: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing the given ones' outputs side by side (y = [y_1 | y_2 | ...]),
    or None when they do not stack (rows_concatenable) or are of different kinds. Why: one
    launch instead of three for a layer's q, k and v projections (each a latency-bound GEMV
    at decode, with its own activation permutation and split-K sum on the GPU)."""
    if all(isinstance(m, DenseLinear) for m in linears):
        if not rows_concatenable([tuple(m.weight.shape) for m in linears], QuantSpec(16)):
            return None
        return DenseLinear(torch.cat([m.weight for m in linears]))
    if not all(isinstance(m, QuantLinear) for m in linears):
        return None
    first = linears[0]
    if any(m.spec != first.spec or m.dtype != first.dtype or m.raw.device != first.raw.device for m in linears):
        return None
    if not rows_concatenable([m.shape for m in linears], first.spec):
        return None
    shape = (sum(m.shape[0] for m in linears), first.shape[1])
    raw = torch.zeros(matrix_layout(shape, first.spec)[1], dtype=torch.uint8, device=first.raw.device)
    comps = component_tensors(raw, shape, first.spec)
    for name, c in comps.items():
        c.view(-1).copy_(torch.cat([m.comps[name].reshape(-1) for m in linears]))
    return QuantLinear(raw, shape, first.spec, first.dtype)
