"""Grouped-query causal self-attention with rotary embeddings and a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kv_cache import KVCache
from .qlinear import concat_rows, forward_partials, input_format
from .rope import Rotary


# Every backend but cuDNN's: cuDNN builds (and caches) an execution plan per sequence length,
# so in decode, where the key length grows by one each step, every call built a new plan:
# 34 ms of host time per call on the H100 host (tools/cpu_overhead.py), 10x the whole layer.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_mask(T: int, start_pos: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """allowed[t, s] (True = attend) for queries at start_pos + t over keys 0 .. start_pos + T - 1;
    None when every key is allowed (a decode step without a sliding window)."""
    S = start_pos + T
    if T == 1 and (window is None or S <= window):
        return None
    q = torch.arange(start_pos, S, device=device)[:, None]  # [T, 1]
    k = torch.arange(S, device=device)[None, :]  # [1, S]
    allowed = k <= q
    if window is not None:
        # transformers' sliding-window overlay: key visible iff kv_idx > q_idx - window
        allowed &= k > q - window
    return allowed


class DevicePosition:
    """One token's position as a device tensor pos [1] (int64) and what attention derives from
    it: the rotary rows and the mask over the cache positions attended (per sliding window).
    Built once per step and shared by every layer (runtime.step_graph), that is ~6 small
    kernels per layer fewer; key_pos: arange(n) on the device, the first n positions of the
    cache attended over (n > pos)."""

    def __init__(self, pos: torch.Tensor, key_pos: torch.Tensor, rotary: Rotary):
        self.pos, self.key_pos = pos, key_pos
        self.cos, self.sin = rotary.rows(pos)  # [1, 1, D] each
        self._allowed: dict[int | None, torch.Tensor] = {}
        self._bias: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """allowed(window) as the additive mask attention applies (0 or -inf) [n]: given a
        boolean mask, scaled_dot_product_attention converts it with three kernels at every
        call, i.e. in every layer; this converts it once per step."""
        b = self._bias.get((window, dtype))
        if b is None:
            b = torch.zeros(self.key_pos.shape, dtype=dtype, device=self.key_pos.device)
            b.masked_fill_(~self.allowed(window), float("-inf"))
            self._bias[(window, dtype)] = b
        return b

    def allowed(self, window: int | None) -> torch.Tensor:
        """allowed[s] (True = attend) over the key positions key_pos."""
        m = self._allowed.get(window)
        if m is None:
            m = self.key_pos <= self.pos  # [ctx]
            if window is not None:
                m &= self.key_pos > self.pos - window
            self._allowed[window] = m
        return m


class Attention(nn.Module):
    def __init__(self, layer: int, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, rotary: Rotary,
                 num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None):
        super().__init__()
        self.layer = layer
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.qkv_proj: nn.Module | None = None  # q, k and v stacked (fuse_qkv)
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.n_rep = num_heads // num_kv_heads
        self.sliding_window = sliding_window

    def fuse_qkv(self) -> bool:
        """Compute q, k and v with one stacked projection where the three stack
        (qlinear.concat_rows); the separate ones are dropped. True if fused."""
        qkv = concat_rows([self.q_proj, self.k_proj, self.v_proj])
        if qkv is None:
            return False
        self.qkv_proj = qkv
        self.q_proj = self.k_proj = self.v_proj = None
        return True

    def _qkv(self, x: torch.Tensor, rotate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, heads, D], k and v [T, kv_heads, D], q and k through `rotate`
        (stacked: one pass over q's and k's heads together, views of one result)."""
        T, D, G, H = x.shape[0], self.head_dim, self.num_kv_heads, self.num_heads
        if self.qkv_proj is None:
            return rotate(self.q_proj(x).view(T, H, D)), rotate(self.k_proj(x).view(T, G, D)), self.v_proj(x).view(T, G, D)
        y = self.qkv_proj(x)  # [T, (H + 2G) * D]
        qk = rotate(y[:, : (H + G) * D].view(T, H + G, D))
        return qk[:, :H], qk[:, H:], y[:, (H + G) * D:].view(T, G, D)

    def forward(self, x: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        # x: [T, H]
        T, D, G, R = x.shape[0], self.head_dim, self.num_kv_heads, self.n_rep
        q, k, v = self._qkv(x, lambda t: self.rotary(t, start_pos))  # [T, G*R, D], [T, G, D], [T, G, D]
        keys, values = cache.update(self.layer, start_pos, k, v)  # [G, S, D] each
        # query head h uses kv head h // R: stack the R query heads of a group along the
        # sequence axis so each kv head is read once, without repeating the cache
        q = q.view(T, G, R, D).permute(1, 2, 0, 3).reshape(G, R * T, D)  # [G, R*T, D], row = r*T + t
        mask = attention_mask(T, start_pos, self.sliding_window, x.device)
        if mask is not None:
            mask = mask.repeat(R, 1)  # [R*T, S]
        # 4-D (batch 1): the fused CUDA kernels take only 4-D inputs, 3-D would fall back to math
        with sdpa_kernel(_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask)[0]  # [G, R*T, D]
        out = out.view(G, R, T, D).permute(2, 0, 1, 3).reshape(T, self.num_heads * D)
        return self.o_proj(out)

    def forward_at(self, x: torch.Tensor, at: DevicePosition, cache: KVCache) -> torch.Tensor:
        """forward for one token at the device position `at`, attending over the first
        at.key_pos.numel() cache positions with a mask: shapes and addresses do not depend on
        the position, so a CUDA graph of it replays at every step that attends as many."""
        # x: [1, H]
        q, k, v = self._qkv(x, lambda t: Rotary.apply(t, at.cos, at.sin))  # [1, G*R, D], [1, G, D], [1, G, D]
        keys, values = cache.write_at(self.layer, at.pos, k, v)  # [G, ctx, D] each
        n = at.key_pos.numel()  # the positions attended over (runtime.step_graph.key_bucket)
        return self.o_proj(self._attend(q, keys[:, :n], values[:, :n], at))

    def input_format(self, x: torch.Tensor):
        """The stacked q/k/v GEMV's input format for x [1, H] (qlinear.input_format), or None."""
        return None if self.qkv_proj is None else input_format(self.qkv_proj, x)

    def forward_fused(self, x: torch.Tensor, at: DevicePosition, cache: KVCache,
                      prepared: torch.Tensor | None = None) -> torch.Tensor:
        """forward_at with the stacked q/k/v GEMV's split-K sum, rotary and the cache write in
        one kernel (kernels.decode_ops.rotary_into_cache), returning the o projection's output
        as the GEMV leaves it ([1, H] or float32 partials [P, 1, H]): the caller's fused norm
        sums it. Needs a power-of-two head_dim. Where q, k and v do not stack (fuse_qkv),
        their three outputs are concatenated first (one launch more). Attention over the cache
        is kernels.decode_ops.attend (split over the keys, with the o projection's input
        format written too), or torch's SDPA where that does not apply. prepared: x in
        input_format (written by the norm before)."""
        from .kernels.decode_ops import attend, attend_supported, rotary_into_cache

        D, G = self.head_dim, self.num_kv_heads
        layer = cache.layers[self.layer]  # [2, G, ctx, D]
        if self.qkv_proj is not None:
            y = forward_partials(self.qkv_proj, x, prepared)  # [1, (heads + 2G) * D] or its partials
        else:
            y = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        q = rotary_into_cache(y, self.num_heads, G, D, self.rotary.cos, self.rotary.sin_signed, at.pos,
                              layer)  # [1, heads * D]
        n = at.key_pos.numel()
        if attend_supported(D, self.n_rep):
            # split over the keys, reading only those up to the position: the SDPA below runs a
            # program per kv head (8 of an H100's 132 SMs) over all n, half of them masked
            out, prepared = attend(q, layer, at.pos, n, self.sliding_window, input_format(self.o_proj, q))
            return forward_partials(self.o_proj, out, prepared)
        return forward_partials(self.o_proj, self._attend(q, layer[0, :, :n], layer[1, :, :n], at))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: DevicePosition) -> torch.Tensor:
        """One token's attention over the keys and values [G, n, D] at.key_pos covers ->
        [1, heads * D]."""
        D, G, R = self.head_dim, self.num_kv_heads, self.n_rep
        q = q.reshape(G, R, D)  # the R query heads of kv head g, as in forward with T = 1
        with sdpa_kernel(_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                                 attn_mask=at.bias(self.sliding_window, q.dtype).expand(R, -1))[0]
        return out.reshape(1, self.num_heads * D)  # out: [G, R, D]
