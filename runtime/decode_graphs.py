"""The dense part of each decoder layer's decode step as one CUDA graph.

A decode step of one layer is: input norm, attention (four projections, rotary, KV cache
write, attention over the cache), residual, post-attention norm, router top-k; then the
experts, whose choice needs a host decision (which slot, copy or not). The first part is
~40 kernel launches and, on the H100 host, ~1-1.5 ms of host time per layer for ~0.1 ms of
GPU work. Here it is captured once per layer, with the position held in a device tensor
(Attention.forward_at), and replayed at every step; the experts stay with the expert
backend (runtime.graphs replays those).

Capture is lazy: at the first one-token step, layer by layer, each segment first runs once
eagerly (on a side stream, as torch's graph docs require: it also compiles the kernels and
writes this step's keys and values, which the replay then writes again, identically), then
is captured and replayed.
"""

from __future__ import annotations

import os

import torch

from .attention import DevicePosition
from .graphs import capture
from .kernels import use_fused
from .moe import route

# "0" keeps torch's small ops between the GEMVs (for A/B timing of fused_segment).
FUSED_ENV = "MOEPACK_FUSED_DECODE"


def fused_applies(layer, h: torch.Tensor) -> bool:
    """Whether `layer`'s one-token segment can run fused_segment for h [1, H]: the fused
    kernels run here (CUDA, or the interpreter) and the shapes suit them."""
    from .kernels.decode_ops import norm_supported, rotary_supported

    attn = layer.attn
    return (h.shape[0] == 1 and os.environ.get(FUSED_ENV, "1") != "0" and use_fused(h)
            and rotary_supported(attn.head_dim)
            and norm_supported(h.shape[1], layer.moe.router.shape[0]))


def segment(layer, h: torch.Tensor, at: DevicePosition, cache) -> tuple[torch.Tensor, ...]:
    """(h_mid, x, topk_idx, topk_w) of DecoderLayer `layer` for one token: h_mid = h + attention,
    x = post-attention norm of h_mid (the experts' input), and the router's choice for x."""
    # h: [1, H]
    if fused_applies(layer, h):
        return fused_segment(layer, h, None, at, cache)[:4]
    h_mid = h + layer.attn.forward_at(layer.input_norm(h), at, cache)
    x = layer.post_attn_norm(h_mid)
    topk_idx, topk_w = route(x, layer.moe.router, layer.moe.top_k)
    return h_mid, x, topk_idx, topk_w


def fused_segment(layer, h: torch.Tensor, pending: torch.Tensor | None, at: DevicePosition, cache,
                  expert_format=None) -> tuple[torch.Tensor, ...]:
    """segment in ~6 launches instead of ~27 (kernels.decode_ops), plus the GEMVs: the
    residual add and norm, the q/k/v GEMV, rotary with the cache write, attention, the o GEMV,
    then the residual add, norm and router top-k in one. `pending` is the previous layer's
    expert output still to be added to h (float32 partials [P, 1, H], or None): the add
    happens inside this layer's first kernel, so the experts' sum never runs as its own
    launch. The norms also write their output in the input format of the GEMV after them
    (the q/k/v GEMV's, and `expert_format`: the experts' first launch's, see
    ResidentExperts.input_format), which saves those conversions' launches.
    -> (h_mid, x, topk_idx, topk_w, x in expert_format or None)."""
    from .kernels.decode_ops import add_rms_norm

    n1, n2, moe = layer.input_norm, layer.post_attn_norm, layer.moe
    first = add_rms_norm(h, pending, n1.weight, n1.eps, fmt=layer.attn.input_format(h))
    o = layer.attn.forward_fused(first.x, at, cache, first.prepared)
    return tuple(add_rms_norm(first.h, o, n2.weight, n2.eps, moe.router, moe.top_k, fmt=expert_format))


class DecodeGraphs:
    """Per-layer graphs of `segment` over one static residual buffer `h` and position `pos`."""

    def __init__(self, model):
        dev = model.device
        self.model = model
        self.h = torch.zeros(1, model.config.hidden_size, dtype=model.dtype, device=dev)  # [1, H]
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(model.max_ctx, device=dev)
        self.capturing = dev.type == "cuda"
        n = len(model.layers)
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * n
        self.outs: list[tuple[torch.Tensor, ...] | None] = [None] * n
        self.pool = torch.cuda.graph_pool_handle() if self.capturing else None
        self.replays = 0

    def begin(self, h: torch.Tensor, start_pos: int) -> None:
        # h: [1, H], the embedded token; one small fill and one copy per step
        self.pos.fill_(start_pos)
        self.h.copy_(h)

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Run layer i's segment on self.h at self.pos: (h_mid, x, topk_idx, topk_w), valid
        until layer i runs again (next step)."""
        if not self.capturing:  # the CPU: the same code, eagerly (what the tests check)
            return self._segment(i)
        g = self.graphs[i]
        if g is None:
            g = self._capture(i)
        g.replay()
        self.replays += 1
        return self.outs[i]

    def _segment(self, i: int) -> tuple[torch.Tensor, ...]:
        # each layer's graph derives the position's rotary rows and mask itself (a graph per
        # layer replays alone); the whole-step graph shares them (runtime.step_graph)
        layer = self.model.layers[i]
        at = DevicePosition(self.pos, self.key_pos, layer.attn.rotary)
        return segment(layer, self.h, at, self.model.cache)

    def _capture(self, i: int) -> torch.cuda.CUDAGraph:
        g, self.outs[i] = capture(lambda: self._segment(i), self.h.device, self.pool)
        self.graphs[i] = g
        return g
