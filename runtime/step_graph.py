"""A whole one-token decode step as one CUDA graph: embedding, every layer (attention, router,
experts), final norm and lm_head, replayed with one call.

Why: with per-layer graphs (runtime.decode_graphs) the host still reads each layer's router
choice before launching its experts: one device-to-host sync per layer, and the GPU idles
while the host decides and launches. On the H100 host that cost ~80 us of host time per
layer, plus the launches of the expert graphs. When the expert backend finds a token's
experts on the device (`routes_on_device`: the kernels read the router's choice from device
memory, kernels.indexed_expert_ffn), nothing in a step needs the host, and the step is
captured once and replayed at every position: the GPU runs the ~50 kernels per layer back
to back.

Capture is lazy, at the first one-token step: the step first runs once eagerly on a side
stream (as torch's graph docs require: it compiles the kernels and writes this position's
keys and values, which the replay then writes again, identically), then is captured and
replayed. Off CUDA the same code runs eagerly (what the CPU tests check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import DevicePosition
from .decode_graphs import segment


def step_graph_applies(model) -> bool:
    """Whether `model`'s one-token steps can run as one graph: its expert backend finds each
    token's experts on the device."""
    return bool(getattr(model.experts, "routes_on_device", False))


class StepGraph:
    """step(token [1] int64, position) -> float32 logits [1, V] of the whole model."""

    def __init__(self, model):
        dev = model.device
        self.model, self.experts = model, model.experts
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(model.max_ctx, device=dev)
        self.capturing = dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output, overwritten by each replay
        self.replays = 0

    def _body(self) -> torch.Tensor:
        m = self.model
        h = F.embedding(self.token, m.embed).to(m.dtype)  # [1, H]
        at = DevicePosition(self.pos, self.key_pos, m.layers[0].attn.rotary)  # one rotary table for all layers
        for layer in m.layers:
            h_mid, x, topk_idx, topk_w = segment(layer, h, at, m.cache)
            h = h_mid + self.experts.forward_routed(layer.moe.layer, x, topk_idx, topk_w)
        return m.lm_head(m.norm(h)).float()  # [1, V]

    def step(self, token: torch.Tensor, start_pos: int) -> torch.Tensor:
        # token: [1]; one small copy and one fill per step
        self.token.copy_(token, non_blocking=True)
        self.pos.fill_(start_pos)
        # counted here, not by forward_routed: a replayed graph runs no Python
        self.experts.count(len(self.model.layers) * self.model.config.num_experts_per_tok)
        if not self.capturing:
            return self._body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.replays += 1
        return self.logits.clone()  # callers may keep logits past the next step

    def _capture(self) -> None:
        dev = self.token.device
        cur = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._body()
        cur.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self.logits = self._body()
        self.graph = g
