"""Rotary position embeddings (the rotate-half convention of Mixtral / Llama), with the
cos/sin tables precomputed once for the whole allocated context."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_ctx: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        # computed in float32 then cast, as transformers does, so both round the same way
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        pos = torch.arange(max_ctx, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq[None, :]  # [ctx, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [ctx, D]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        # rotate_half(x) * sin == roll(x, D/2) * sin with its first half negated: one op (roll)
        # instead of two (neg, cat) per call, the same values (a sign flip is exact)
        signed = emb.sin()
        signed[:, : head_dim // 2] = -signed[:, : head_dim // 2]
        self.register_buffer("sin_signed", signed.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        # x: [T, heads, D] at positions start_pos .. start_pos + T - 1
        T = x.shape[0]
        cos = self.cos[start_pos : start_pos + T, None, :]  # [T, 1, D]
        sin = self.sin_signed[start_pos : start_pos + T, None, :]
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    def rows(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, 1, D] of the device position pos [1] (int64): nothing depends on a
        host integer, so a CUDA graph can replay it; computed once per step and shared by
        every layer's q and k (attention.DevicePosition)."""
        return self.cos.index_select(0, pos)[:, None, :], self.sin_signed.index_select(0, pos)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """forward with the rows of `rows`: x [1, heads, D]."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
