"""Linear layers over weights read from a .moepack file: dense, or packed and dequantized
on the fly (the plain-torch path; fused kernels replace QuantLinear.forward later)."""

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

    def weight(self) -> torch.Tensor:
        return dequantize(self.comps, self.shape, self.spec, self.dtype)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            return qmatmul(x.to(self.dtype), self.comps, self.shape, self.spec)
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.spec.describe()}"


def make_linear(raw: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype,
                dequantize_at_load: bool) -> nn.Module:
    """raw: the tensor's record bytes (uint8, on the compute device)."""
    if spec.quantized and not dequantize_at_load:
        return QuantLinear(raw, shape, spec, dtype)
    return DenseLinear(dequantize(component_tensors(raw, shape, spec), shape, spec, dtype))
