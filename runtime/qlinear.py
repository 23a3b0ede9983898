"""Linear layers over weights read from a .moepack file: dense, or packed and computed on the
fly (fused Triton kernels on the GPU; for a few tokens on the CPU, runtime.cpu_expert's
kernels; else dequantize, then matmul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formats.qtensor import QuantSpec

from .dequant import component_tensors, dequantize
from .kernels import qmatmul, use_fused


class DenseLinear(nn.Module):
    """y = x @ W.T with W [out, in] held dense in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class QuantLinear(nn.Module):
    """y = x @ W.T with W kept packed on the device (its record's bytes) and dequantized in
    every forward: memory stays at the packed size at the cost of a dequantize per call."""

    def __init__(self, raw: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype):
        super().__init__()
        self.shape, self.spec, self.dtype = tuple(shape), spec, dtype
        self.register_buffer("raw", raw, persistent=False)  # uint8 [nbytes]
        self.comps = component_tensors(raw, self.shape, spec)
        self._desc: tuple | None = None  # (runtime.cpu_native.matrix_descriptor,) once computed

    def weight(self) -> torch.Tensor:
        return dequantize(self.comps, self.shape, self.spec, self.dtype)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            return qmatmul(x.to(self.dtype), self.comps, self.shape, self.spec)
        if x.device.type == "cpu" and self.raw.device.type == "cpu":
            y = self._cpu_kernel(x)
            if y is not None:
                return y
        return F.linear(x, self.weight())

    def _cpu_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T by runtime.cpu_expert's kernels for a few tokens (a GEMV straight on the packed
        bytes, the decode case), or None: many tokens amortise one dequantize, and tiny or odd
        layouts may have no kernel."""
        from .experts import CPU_KERNEL_MAX_TOKENS

        rows = x.numel() // x.shape[-1]
        if rows > CPU_KERNEL_MAX_TOKENS or not self.spec.quantized:
            return None
        from .cpu_expert import _native, cpu_expert_available, kernel_matvec

        if not cpu_expert_available():
            return None
        xs = x.detach().reshape(rows, x.shape[-1]).to(torch.float32).contiguous()  # [T, K]
        native = _native()
        if native is not None and self.raw.is_contiguous():
            # the compiled kernel straight on the raw bytes: no views, a few us per call
            from .cpu_native import matrix_descriptor

            if self._desc is None:
                self._desc = (matrix_descriptor(self.shape, self.spec),)
            if self._desc[0] is not None:
                y = native.gemv(self.raw, self._desc[0], xs, torch.get_num_threads())
                if y is not None:
                    return y.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)
        y = kernel_matvec({k: v.numpy() for k, v in self.comps.items()}, self.spec, xs.numpy())
        if y is None:
            return None
        return torch.from_numpy(y).reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.spec.describe()}"


def make_linear(raw: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype,
                dequantize_at_load: bool) -> nn.Module:
    """raw: the tensor's record bytes (uint8, on the compute device)."""
    if spec.quantized and not dequantize_at_load:
        return QuantLinear(raw, shape, spec, dtype)
    return DenseLinear(dequantize(component_tensors(raw, shape, spec), shape, spec, dtype))
