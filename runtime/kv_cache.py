"""The key/value cache: preallocated once for the requested context, per layer
[2, kv_heads, ctx, head_dim] so the attended prefix of a layer is a strided view that
scaled_dot_product_attention reads directly (no concatenation, no copy per step)."""

from __future__ import annotations

import torch

from formats.errors import ConfigError


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_ctx: int, device: torch.device, dtype: torch.dtype):
        if max_ctx < 1:
            raise ConfigError(f"context length {max_ctx} must be at least 1")
        self.max_ctx = max_ctx
        self.layers = [torch.zeros((2, kv_heads, max_ctx, head_dim), dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, kv_heads, D] at start_pos; return the keys and values of positions
        0 .. start_pos + T - 1, each [kv_heads, S, D]."""
        T = k.shape[0]
        end = start_pos + T
        if end > self.max_ctx:
            raise ConfigError(
                f"position {end - 1} is past the allocated context of {self.max_ctx} tokens",
                hint="allocate a longer context (--ctx)",
            )
        cache = self.layers[layer]
        cache[0, :, start_pos:end] = k.transpose(0, 1)
        cache[1, :, start_pos:end] = v.transpose(0, 1)
        return cache[0, :, :end], cache[1, :, :end]

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token's k, v [1, kv_heads, D] at the device position pos [1] (int64, the
        caller checked it is < max_ctx); return the whole cache of the layer, keys and values
        [kv_heads, max_ctx, D] each: positions past pos hold zeros or stale values, which the
        caller masks out."""
        cache = self.layers[layer]
        cache[0].index_copy_(1, pos, k.transpose(0, 1))
        cache[1].index_copy_(1, pos, v.transpose(0, 1))
        return cache[0], cache[1]
