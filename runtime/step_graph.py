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
from .decode_graphs import fused_applies, fused_segment, segment
from .graphs import capture


def step_graph_applies(model) -> bool:
    """Whether `model`'s one-token steps can run as one graph: its expert backend finds each
    token's experts on the device, and the embedding table is there too."""
    return bool(getattr(model.experts, "routes_on_device", False)) and not model.embed_on_host


# The smallest number of cache positions a step attends over (the buckets double from here).
MIN_KEYS = 256


def key_bucket(pos: int, max_ctx: int, whole: bool = False) -> int:
    """How many cache positions a step at `pos` attends over. whole: all of them, since the
    step attends with kernels.decode_ops.attend, whose kernels read only the keys up to the
    position whatever the count (one graph for every step). Else torch's attention, which
    reads every key it is given, masked or not: the next power of two above pos, at least
    MIN_KEYS, at most the allocated context (the whole cache would be ~16 MB of keys and
    values per Mixtral layer at the default 4096, whatever the position)."""
    if whole:
        return max_ctx
    return min(max(MIN_KEYS, 1 << pos.bit_length()), max_ctx)


def attends_by_split(model) -> bool:
    """Whether every layer of `model`'s fused one-token step attends with decode_ops.attend."""
    from .kernels.decode_ops import attend_supported

    h = torch.zeros(1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    return all(fused_applies(layer, h) and attend_supported(layer.attn.head_dim, layer.attn.n_rep)
               for layer in model.layers)


class StepGraph:
    """step(token [1] int64, position) -> float32 logits [1, V] of the whole model: one graph
    per key bucket (key_bucket), captured when a step first reaches it; one graph in all
    where the split-key attention runs (attends_by_split)."""

    def __init__(self, model):
        dev = model.device
        self.model, self.experts = model, model.experts
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(model.max_ctx, device=dev)
        self.capturing = dev.type == "cuda"
        # bucket -> (graph, its logits output, overwritten by each replay); the graphs share one
        # memory pool: they never run at the same time
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capturing else None
        self.replays = 0
        self.whole: bool | None = None  # attends_by_split, asked at the first step (MOEPACK_* read then)

    def _body(self, keys: int) -> torch.Tensor:
        m = self.model
        h = F.embedding(self.token, m.embed).to(m.dtype)  # [1, H]
        # one rotary table for all layers, and attention over the first `keys` cache positions
        at = DevicePosition(self.pos, self.key_pos[:keys], m.layers[0].attn.rotary)
        if all(fused_applies(layer, h) for layer in m.layers):
            return self._fused_body(h, at)
        for layer in m.layers:
            h_mid, x, topk_idx, topk_w = segment(layer, h, at, m.cache)
            h = h_mid + self.experts.forward_routed(layer.moe.layer, x, topk_idx, topk_w)
        return m.lm_head(m.norm(h)).float()  # [1, V]

    def _fused_body(self, h: torch.Tensor, at: DevicePosition) -> torch.Tensor:
        """_body through decode_graphs.fused_segment: each layer's expert output stays float32
        partials until the next layer's first kernel (or the final norm) adds them."""
        from .kernels.decode_ops import add_rms_norm

        m = self.model
        pending = None
        fmt = self.experts.input_format(h, m.config.num_experts_per_tok)
        for layer in m.layers:
            h, x, topk_idx, topk_w, xf = fused_segment(layer, h, pending, at, m.cache, fmt)  # h: h_mid
            pending = self.experts.forward_routed(layer.moe.layer, x, topk_idx, topk_w, partials=True, prepared=xf)
        return m.lm_head(add_rms_norm(h, pending, m.norm.weight, m.norm.eps).x).float()  # [1, V]

    def step(self, token: torch.Tensor, start_pos: int) -> torch.Tensor:
        # token: [1]; one small copy and one fill per step
        self.token.copy_(token, non_blocking=True)
        self.pos.fill_(start_pos)
        # counted here, not by forward_routed: a replayed graph runs no Python
        self.experts.count(len(self.model.layers) * self.model.config.num_experts_per_tok)
        if self.whole is None:
            self.whole = attends_by_split(self.model)
        keys = key_bucket(start_pos, self.key_pos.numel(), self.whole)
        if not self.capturing:
            return self._body(keys)
        if keys not in self.graphs:
            self.graphs[keys] = self._capture(keys)
        graph, logits = self.graphs[keys]
        graph.replay()
        self.replays += 1
        return logits.clone()  # callers may keep logits past the next step

    def _capture(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return capture(lambda: self._body(keys), self.token.device, self.pool)
